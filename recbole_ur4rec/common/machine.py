"""The machine a result was computed on: what decides its float kernels, so that a result can be compared bit for
bit only with one made where the same kernels ran."""
import os
import platform
from importlib import metadata

# Environment variables that change which float kernels run (torch's vectorised ops, MKL's and OpenBLAS's BLAS)
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
LIBRARIES = ("torch", "numpy", "recbole", "faiss-cpu", "sentence-transformers")


def _cpuinfo():
    """``vendor_id`` and ``model name`` of the first processor in /proc/cpuinfo (empty off Linux)."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "model name") and key not in found:
                    found[key] = value.strip()
                if len(found) == 2:
                    break
    except OSError:
        pass
    return found.get("vendor_id") or platform.processor() or "", found.get("model name") or ""


def machine_fingerprint():
    """Plain data naming the CPU (vendor and model), the kernels torch picks (``torch_cpu_capability``), the BLAS
    settings, the threads and the library versions a result was computed with."""
    import torch

    vendor, model = _cpuinfo()
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_vendor": vendor,
        "cpu_model": model,
        "machine": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "kernel_env": {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ},
        "python": platform.python_version(),
        "libraries": versions,
    }


def same_kernels(a, b):
    """Whether two fingerprints describe the same float kernels: every key equal (a missing key never matches)."""
    keys = ("cpu_vendor", "cpu_model", "machine", "torch_cpu_capability", "torch_threads", "kernel_env", "libraries")
    return all(key in a and key in b and a[key] == b[key] for key in keys)
