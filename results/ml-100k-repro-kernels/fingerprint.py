"""Fingerprint of the float kernels this process gets (run under a variant's env): prints JSON."""
import json, os, platform, re, subprocess, sys
import numpy, torch, recbole

def cpuinfo():
    info = {}
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "cpu family", "model", "model name", "stepping", "microcode") and key not in info:
            info[key] = value.strip()
        if key == "flags" and "flags" not in info:
            flags = value.split()
            info["flags"] = " ".join(f for f in flags if re.match(r"(avx|fma|amx|sse4|f16c)", f))
    info["logical_cpus"] = os.cpu_count()
    return info

def verbose_lines():
    code = "import torch,torch.nn.functional as F;torch.set_num_threads(1);a=torch.randn(64,64,requires_grad=True);F.gelu(a@a.detach()).sum().backward()"
    env = {**os.environ, "MKL_VERBOSE": "1", "ONEDNN_VERBOSE": "1"}
    text = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
    mkl = next((l for l in text.splitlines() if l.startswith("MKL_VERBOSE oneMKL")), None)
    isa = next((l.split("isa:")[1] for l in text.splitlines() if "onednn_verbose" in l and "isa:" in l), None)
    jit = next((re.search(r",(jit:[^,]+),", l).group(1) for l in text.splitlines() if "exec,cpu,eltwise" in l), None)
    cnr = next((re.search(r"CNR:(\S+)", l).group(1) for l in text.splitlines() if "SGEMM" in l and "CNR:" in l), None)
    return {"mkl_verbose": mkl, "mkl_cbwr": cnr, "onednn_isa": isa, "onednn_gelu_impl": jit}

probe = json.loads(subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "probe.py")], capture_output=True, text=True).stdout)
print(json.dumps({
    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "torch": torch.__version__, "numpy": numpy.__version__, "recbole": recbole.__version__,
    "python": platform.python_version(), "machine": platform.machine(),
    "cpu": cpuinfo(),
    "torch_blas": re.search(r"BLAS_INFO=(\w+)", torch.__config__.show()).group(1),
    "torch_mkl": next(l.strip() for l in torch.__config__.show().splitlines() if "Math Kernel Library" in l),
    "torch_mkldnn": next(l.strip() for l in torch.__config__.show().splitlines() if "MKL-DNN" in l),
    **verbose_lines(),
    "numpy_openblas_core": probe["numpy_openblas_core"],
    "bernoulli_mkl_vsl_path": probe["bernoulli_one_draw_per_call (MKL VSL path)"],
    "op_hashes": probe["ops"],
}))
