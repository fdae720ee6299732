"""Build of aimv2-kernels and its compiled extension ``aimv2_kernels._C``.

The CPU part of the extension is always built. The CUDA part is built only when torch is a CUDA build and
``nvcc`` is on the PATH (or ``CUDA_HOME`` is set); ``AIMV2_SKIP_CUDA_BUILD=1`` turns it off,
``AIMV2_CUDA_ARCHS`` (default ``"80;90a"``) picks the architectures and ``AIMV2_PTXAS_VERBOSE=1`` prints
ptxas's register and spill report. The install never fails for lack of CUDA: the reference and Triton paths
work without it. ``MAX_JOBS`` bounds ninja's parallelism.

CUDA sources: ``csrc/cuda/*.cu`` include CUDA's own headers only; ``csrc/cuda/*_glue.cpp`` register them with
the dispatcher and include ATen/c10 core headers only, so both compile-check on a machine with a CPU torch
(``tools/cuda_compile_check.py``).
"""
import glob
import os
import shutil

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - build-time message
    raise SystemExit(
        "aimv2-kernels builds its extension against an installed torch. Install torch first "
        "(CPU machines: pip install torch==2.13.0), then: pip install --no-build-isolation ."
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("AIMV2_SKIP_CUDA_BUILD", "0") == "1":
        print("aimv2-kernels: AIMV2_SKIP_CUDA_BUILD=1, building the CPU extension only")
        return False
    if torch.version.cuda is None:
        print("aimv2-kernels: torch is a CPU build, building the CPU extension only")
        return False
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        print("aimv2-kernels: no CUDA toolkit (nvcc) found, building the CPU extension only")
        return False
    return True


def _cuda_arch_flags() -> list[str]:
    archs = os.environ.get("AIMV2_CUDA_ARCHS", "80;90a")
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-std=c++17"]
    if _want_cuda():
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        glue = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        return CUDAExtension(
            "aimv2_kernels._C",
            cpp + glue + cu,
            define_macros=[("AIMV2_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo", *_cuda_arch_flags(),
                                                      *(["-Xptxas=-v"] if os.environ.get("AIMV2_PTXAS_VERBOSE") == "1"
                                                        else [])]},
        )
    return CppExtension("aimv2_kernels._C", cpp, extra_compile_args={"cxx": cxx})


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
