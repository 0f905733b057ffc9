"""The machine a result was computed on: what decides its float kernels, so that a result can be compared bit for
bit only with one made where the same kernels ran."""
import os
import platform
from importlib import metadata

# Environment variables that change which float kernels run: torch's vectorised ops, MKL's BLAS, oneDNN's JIT
# kernels (torch's GELU), numpy's OpenBLAS
KERNEL_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
)
CPUINFO_KEYS = ("vendor_id", "model name", "cpu family", "model", "stepping")
LIBRARIES = ("torch", "numpy", "recbole", "faiss-cpu", "sentence-transformers")


def _cpuinfo():
    """The CPUINFO_KEYS of the first processor in /proc/cpuinfo (empty off Linux): a model name alone may be generic
    ("Intel(R) Xeon(R) Processor"), its family, model and stepping are not."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in CPUINFO_KEYS and key not in found:
                    found[key] = value.strip()
                if not line.strip() and found:  # the end of the first processor's block
                    break
    except OSError:
        pass
    return found


def machine_fingerprint():
    """Plain data naming the CPU (vendor and model), the kernels torch picks (``torch_cpu_capability``), the BLAS
    settings, the threads and the library versions a result was computed with."""
    import torch

    cpu = _cpuinfo()
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_vendor": cpu.get("vendor_id") or platform.processor(),
        "cpu_model": cpu.get("model name", ""),
        "cpu_family_model_stepping": [cpu.get("cpu family"), cpu.get("model"), cpu.get("stepping")],
        "machine": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "kernel_env": {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ},
        "python": platform.python_version(),
        "libraries": versions,
    }


def same_kernels(a, b):
    """Whether two fingerprints describe the same float kernels: every key equal (a missing key never matches)."""
    keys = ("cpu_vendor", "cpu_model", "cpu_family_model_stepping", "machine", "torch_cpu_capability", "torch_threads",
            "kernel_env", "libraries")
    return all(key in a and key in b and a[key] == b[key] for key in keys)
