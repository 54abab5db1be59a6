#!/usr/bin/env python
"""kd2: knowledge distillation for object detectors (Detectron2 extension, torchvision backend).

The C++/CUDA extension ``kd2._C`` is built with ``torch.utils.cpp_extension`` when its sources
exist under ``kd2/csrc``; a CUDA build is attempted only when ``nvcc`` and ``CUDA_HOME`` are
available, so building never needs a GPU.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup


def _set_cuda_home() -> None:
    """Point CUDA_HOME at a full toolkit when it is unset and ``nvcc`` on PATH is a wrapper.

    torch.utils.cpp_extension guesses the toolkit as the parent of ``nvcc``'s directory; for a
    wrapper script such as /usr/local/bin/nvcc that directory has no CUDA headers. Must run
    before torch.utils.cpp_extension is imported.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for root in roots + ["/usr/local/cuda"]:
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")) and os.path.isfile(
            os.path.join(root, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = root
            return


def get_extensions():
    """The ``kd2._C`` extension: C++ kernels always, CUDA kernels when a toolkit is found.

    CUDA is compiled when ``kd2/csrc/*.cu`` exist and either ``CUDA_HOME`` is found or
    ``FORCE_CUDA=1``; ``KD2_NO_CUDA=1`` turns it off. No GPU is needed to build.
    """
    csrc = os.path.join("kd2", "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    if not sources:
        return [], {}
    if os.environ.get("KD2_NO_CUDA") != "1":
        _set_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_sources = sorted(glob.glob(os.path.join(csrc, "*.cu")))
    use_cuda = (
        bool(cuda_sources)
        and os.environ.get("KD2_NO_CUDA") != "1"
        and (CUDA_HOME is not None or os.environ.get("FORCE_CUDA") == "1")
    )
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        import torch

        if not torch.cuda.is_available():
            # No GPU to build for (CI, a login node): torch would otherwise fail to pick an arch.
            # A short list keeps the build fast on a 2-core machine: native code for Ampere (8.0,
            # which also runs on 8.6 / 8.9) and Hopper (9.0), plus 9.0 PTX that the driver
            # JIT-compiles for newer GPUs.
            # Set TORCH_CUDA_ARCH_LIST to build for others (e.g. "8.6;8.9").
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    ext_cls = CUDAExtension if use_cuda else CppExtension
    define_macros = [("WITH_CUDA", None)] if use_cuda else []
    # One translation unit per file (the .cu files include no ATen headers), so ninja compiles
    # them in parallel; MAX_JOBS caps the parallel jobs as usual.
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
        "faster-coco-eval",
        "opencv-python-headless",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "dev": [
            "pytest",
            "ruff",
            "onnx",
            "onnxruntime",
            "onnxscript",
            "mkdocs-material",
            "import-linter",
        ],
        # the transformers backend (kd2.hf): DETR-family detectors; scipy for their Hungarian
        # matcher. The lower bound is the version tested.
        "hf": ["transformers>=5.25", "scipy"],
        # backbone-only foundation-model teachers (kd2.foundation): DINOv2 / DINOv3 through
        # transformers, any timm model; weights read from safetensors files only
        "foundation": ["transformers>=5.25", "timm>=1.0", "safetensors"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
