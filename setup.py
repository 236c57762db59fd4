"""Build and install the ``deformable_detr`` package and its compiled op ``deformable_detr._C``.

The CPU kernel is always built. The CUDA kernel is built when a CUDA toolkit is found;
``FORCE_CUDA=1`` forces it and ``FORCE_CUDA=0`` skips it. ``TORCH_CUDA_ARCH_LIST`` restricts the
GPU architectures compiled (fewer architectures build faster).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

PROJECT_DIR = os.path.join("projects", "DeformableDETR")
CSRC_DIR = os.path.join(PROJECT_DIR, "csrc")


def _find_cuda_home():
    """Locate the CUDA toolkit, seeing through wrapper scripts that exec the real ``nvcc``."""
    from torch.utils.cpp_extension import CUDA_HOME

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        # Some installs put a small shell script on the PATH that execs the toolkit's nvcc;
        # torch would then guess the script's folder as the toolkit.
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
        except OSError:
            head = b""
        if head.startswith(b"#!"):
            for token in head.decode(errors="ignore").split():
                if token.endswith("/bin/nvcc") and os.path.exists(token):
                    return os.path.dirname(os.path.dirname(token))
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return CUDA_HOME


def _want_cuda(cuda_home):
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return False
    if force == "1":
        if cuda_home is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME).")
        return True
    return cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


def _openmp_flags():
    """Compiler and linker flags for the CPU kernels' ``at::parallel_for`` loops.

    With PyTorch's OpenMP backend these loops are OpenMP regions compiled into the extension:
    without the compiler's OpenMP flag they silently run on one thread. Linking with it records
    libgomp.so.1, which resolves to the copy PyTorch has already loaded.
    """
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        # Apple's clang has no -fopenmp; the loops stay serial there.
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def get_extensions():
    import torch.utils.cpp_extension as cpp_ext
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob(os.path.join(CSRC_DIR, "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC_DIR, "*.cu")))
    if not cpu_sources:
        raise RuntimeError(f"no C++ sources found in {CSRC_DIR}")

    openmp_compile, openmp_link = _openmp_flags()
    extra_compile_args = {"cxx": ["-O3", "-std=c++20"] + openmp_compile}
    define_macros = []
    cuda_home = _find_cuda_home()
    if _want_cuda(cuda_home):
        os.environ["CUDA_HOME"] = cuda_home
        cpp_ext.CUDA_HOME = cuda_home
        # Toolkits laid out with lib/ instead of lib64/ need the linker pointed at them.
        for sub in ("lib64", "lib"):
            libdir = os.path.join(cuda_home, sub)
            if os.path.isdir(libdir):
                os.environ["LIBRARY_PATH"] = os.pathsep.join(
                    p for p in (libdir, os.environ.get("LIBRARY_PATH", "")) if p
                )
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = [
            "-O3",
            "-std=c++20",
            "--expt-relaxed-constexpr",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
        ]
        extension, sources = CUDAExtension, cpu_sources + cuda_sources
    else:
        extension, sources = CppExtension, cpu_sources

    return [
        extension(
            "deformable_detr._C",
            sources,
            include_dirs=[os.path.abspath(CSRC_DIR)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=openmp_link,
        )
    ]


if __name__ == "__main__":
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="deformable_detr",
        version="0.1.0",
        description="Deformable DETR as a Detectron2 project, with a CPU and CUDA deformable op",
        package_dir={"": PROJECT_DIR},
        packages=find_packages(PROJECT_DIR, exclude=("tests",)),
        python_requires=">=3.10",
        ext_modules=get_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )
