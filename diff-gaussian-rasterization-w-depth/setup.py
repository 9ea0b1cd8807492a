"""Builds one rasterizer package: the Python package beside this file, plus its CUDA extension
``<package>._C`` when a CUDA toolkit is present and a GPU is visible (or FORCE_CUDA=1).
Without them the package installs as pure Python and every call takes the PyTorch path.

Shared, through a symbolic link, by diff-gaussian-rasterization-w-depth and -feat.
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = next(
    d
    for d in sorted(os.listdir(HERE))
    if d.startswith("diff_gaussian_rasterization") and os.path.isdir(os.path.join(HERE, d))
)
SOURCES = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))


def locate_cuda_home():
    """Set CUDA_HOME from nvcc itself when unset: torch guesses the parent of nvcc's folder, wrong
    when nvcc on the PATH is a wrapper script (e.g. /usr/local/bin/nvcc)."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True).stderr
    except OSError:
        return
    top = re.search(r"TOP=(\S+)", dry)
    if top and os.path.isfile(os.path.join(top.group(1), "include", "cuda_runtime_api.h")):
        os.environ["CUDA_HOME"] = os.path.normpath(top.group(1))


def want_cuda():
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    if os.environ.get("FORCE_CUDA") == "0" or not SOURCES:
        return False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False
    return CUDA_HOME is not None and torch.cuda.is_available()


locate_cuda_home()
ext_modules, cmdclass = [], {}
if want_cuda():
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext_modules = [
        CUDAExtension(
            name=f"{PACKAGE}._C",
            sources=SOURCES,
            # no --use_fast_math: the projection relies on IEEE division and square root to reproduce
            # the reference's radii exactly; the blending kernels call the fast intrinsics themselves
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name=PACKAGE.replace("_", "-"),
    version="0.1.0",
    license="MIT",
    packages=[PACKAGE],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
