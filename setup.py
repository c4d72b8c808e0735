"""opd-fast packaging. Pure-Python package plus the csrc extension (see csrc/README.md for what is built where).

setup.py imports torch to build the extensions against it, so install torch first and build without isolation:
    pip install torch==2.13.0 && pip install --no-build-isolation -e .
"""

import os
import re
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def extensions():
    """opd_fast._C (CPU, always: it is the fast CPU path, so a failed build must fail the install) and
    opd_fast._C_cuda (only where torch has CUDA and a CUDA toolkit is found; OPD_FAST_NO_CUDA=1 skips it)."""
    # The source includes ATen and torch's pybind casters, not all of torch/extension.h: a 17 s build instead of 74 s.
    # -fopenmp makes at::parallel_for (an OpenMP region in ATen's headers) actually run in parallel; at run time it
    # binds to the libgomp.so.1 that torch has already loaded, so there is one OpenMP runtime in the process.
    cpu = CppExtension(
        "opd_fast._C",
        ["csrc/opd_step_cpu.cpp"],
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-g0"]},  # -g0: no debug info, the build takes 1/4 the time
        extra_link_args=["-fopenmp"],
    )
    exts = [cpu]
    if torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("OPD_FAST_NO_CUDA") != "1":
        # Set TORCH_CUDA_ARCH_LIST (e.g. "9.0") to build for one architecture; the default is the visible GPU's.
        # A node without a GPU (a cluster's login node) has none to ask, and torch's build then fails with an
        # IndexError: build for A100 and H100/H200, plus PTX for newer GPUs.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
            print(f"opd-fast: no GPU visible, building opd_fast._C_cuda for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}")
        # The binding includes ATen and torch's pybind casters, like opd_fast._C, and -g0 overrides the -g of
        # Python's CFLAGS. nvcc has no -g0 and needs none: it emits debug info only when asked (-g, -G, -lineinfo).
        exts.append(
            CUDAExtension(
                "opd_fast._C_cuda",
                ["csrc/opd_step_cuda_binding.cpp", "csrc/opd_step_cuda.cu"],
                extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "-std=c++17"]},
            )
        )
    return exts


CPU_STACK = ["torch==2.13.0", "triton==3.7.1"]  # torch pinned: an unpinned torch pulls the multi-GB CUDA build
# the version lives in opd_fast/__init__.py alone (`opd-fast --version` prints it); read, not imported: importing the
# package here would need its dependencies at build time
VERSION = re.search(
    r'^__version__ = "([^"]+)"$', (Path(__file__).parent / "opd_fast" / "__init__.py").read_text(), re.MULTILINE
).group(1)

setup(
    name="opd-fast",
    version=VERSION,
    description="High-throughput multi-task on-policy distillation (DiffusionOPD) for SD3.5 / FLUX",
    python_requires=">=3.10",
    packages=find_packages(include=["opd_fast", "opd_fast.*"]),
    # the built-in configs and the tiny world (opd_fast.resources), a copy of configs/ that tests keep identical
    package_data={"opd_fast": ["builtin/*.yaml", "builtin/tiny/*/*", "builtin/tiny/*/*/*"]},
    install_requires=[
        "torch>=2.5",
        "diffusers>=0.40",
        "peft>=0.17",
        "transformers>=4.50",
        "safetensors",
        "pyyaml",
        "numpy",
        "tqdm",
        "tensorboard",
        "pillow",
        "nvtx",
    ],
    extras_require={
        "cpu": CPU_STACK,
        "deepspeed": ["deepspeed>=0.19"],
        # ruff pinned: CI checks its formatting, which another version may change
        "test": [
            "pytest",
            "pytest-benchmark",
            "ruff==0.17.6",
            "deepspeed>=0.19",
            "wandb>=0.19",
            "matplotlib",
            "fastapi>=0.100",
            "uvicorn>=0.20",
            "rapidocr-onnxruntime>=1.4",
        ],
        # opd-fast reward-server (the `remote` reward itself needs only the standard library)
        "serve": ["fastapi>=0.100", "uvicorn>=0.20"],
        # the ocr reward's rapidocr engine: PP-OCRv4 on onnxruntime, models inside the wheel (pulls opencv-python)
        "ocr": ["rapidocr-onnxruntime>=1.4"],
        "wandb": ["wandb>=0.19"],  # logging.trackers: [wandb]
        "report": ["matplotlib"],  # opd-fast report --out: curves.png
        # GPU-only: never required, detected at run time.
        "fp8": ["transformer-engine[pytorch]"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["opd-fast = opd_fast.cli:main"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
