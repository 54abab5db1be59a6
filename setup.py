#!/usr/bin/env python
"""kd2: knowledge distillation for object detectors (Detectron2 extension, torchvision backend).

The C++/CUDA extension ``kd2._C`` is built with ``torch.utils.cpp_extension`` when its sources
exist under ``kd2/csrc``; a CUDA build is attempted only when ``nvcc`` and ``CUDA_HOME`` are
available, so building never needs a GPU.
"""

import glob
import os

from setuptools import find_packages, setup


def get_extensions():
    csrc = os.path.join("kd2", "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_sources = sorted(glob.glob(os.path.join(csrc, "*.cu")))
    use_cuda = bool(cuda_sources) and CUDA_HOME is not None and os.environ.get("KD2_NO_CUDA") != "1"
    ext_cls = CUDAExtension if use_cuda else CppExtension
    define_macros = [("WITH_CUDA", None)] if use_cuda else []
    ext = ext_cls(
        "kd2._C",
        sources + (cuda_sources if use_cuda else []),
        define_macros=define_macros,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]} if use_cuda else {"cxx": ["-O3"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = get_extensions()

setup(
    name="kd2",
    version="0.1.0",
    description="Knowledge distillation for object detectors (Detectron2 + torchvision)",
    packages=find_packages(include=["kd2", "kd2.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "torchvision",
        "fvcore",
        "pycocotools",
        "opencv-python-headless",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={"dev": ["pytest", "ruff"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
