"""Build taca's extensions over one C core.

- libtaca_core (static, C99 + OpenMP): csrc/taca_common.c and the CPU kernels.
- taca._numpy_C: the CPython/NumPy binding (csrc/bind_numpy.c), no torch needed at run time.
- taca._C: the PyTorch binding (csrc/bind_torch.cpp); with CUDA kernels (csrc/cuda/*.cu)
  when torch has CUDA and nvcc is found (or TACA_FORCE_CUDA=1), CPU-only otherwise.

Environment: TACA_NATIVE=0 drops -march=native; TORCH_CUDA_ARCH_LIST picks GPU targets
(default "8.0;9.0a"); TACA_NO_CUDA=1 builds CPU-only.
Install: pip install --no-build-isolation -e .
"""
import glob
import os
import shlex
import shutil
import sys

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def use_system_gcc_if_path_gcc_differs():
    """A GCC on PATH of another major version than /usr/bin/g++ (e.g. /opt/gcc on the GPU image)
    builds a _C.so that crashes when a C++ exception unwinds (libgcc_s/libstdc++ mismatch with
    torch's build): then build with /usr/bin/gcc and /usr/bin/g++ (CC, CXX, LDSHARED; nvcc's host
    compiler follows CC). Skipped when CC or CXX is set, or with TACA_KEEP_CC=1."""
    import subprocess

    if os.environ.get("TACA_KEEP_CC", "0") == "1" or "CC" in os.environ or "CXX" in os.environ:
        return
    sys_gcc, sys_gxx = "/usr/bin/gcc", "/usr/bin/g++"
    path_gxx = shutil.which("g++")
    if path_gxx is None or not (os.path.exists(sys_gcc) and os.path.exists(sys_gxx)):
        return
    if os.path.realpath(path_gxx) == os.path.realpath(sys_gxx):
        return

    def major(exe):
        try:
            out = subprocess.run([exe, "-dumpversion"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return out.strip().split(".")[0] or None

    path_v, sys_v = major(path_gxx), major(sys_gxx)
    if path_v is None or sys_v is None or path_v == sys_v:
        return
    os.environ["CC"], os.environ["CXX"] = sys_gcc, sys_gxx
    os.environ.setdefault("LDSHARED", f"{sys_gcc} -shared")
    print(f"taca setup: g++ on PATH ({path_gxx}, GCC {path_v}) differs from {sys_gxx} (GCC {sys_v}): building with "
          f"CC={sys_gcc} CXX={sys_gxx} LDSHARED='{os.environ['LDSHARED']}' (TACA_KEEP_CC=1 keeps PATH's)", file=sys.stderr)


CORE_SOURCES = ["csrc/taca_common.c", "csrc/taca_fwd_cpu.c", "csrc/taca_bwd_cpu.c"]

native = ["-march=native"] if os.environ.get("TACA_NATIVE", "1") != "0" else []
core_cflags = ["-O3", "-std=c99", "-fPIC", "-fopenmp", "-Wall", "-Wextra"] + native
libraries = [("taca_core", {"sources": CORE_SOURCES, "include_dirs": ["csrc"], "cflags": core_cflags})]


def numpy_extension():
    import numpy as np

    return Extension(
        "taca._numpy_C",
        sources=["csrc/bind_numpy.c"],
        include_dirs=["csrc", np.get_include()],
        extra_compile_args=["-O2", "-std=c99", "-Wall"],
        extra_link_args=["-fopenmp"],
    )


def want_cuda(torch_cuda_available_at_build):
    if os.environ.get("TACA_NO_CUDA", "0") == "1":
        return False
    if os.environ.get("TACA_FORCE_CUDA", "0") == "1":
        return True
    return torch_cuda_available_at_build


def torch_extension():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    has_nvcc = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    use_cuda = want_cuda(torch.version.cuda is not None and has_nvcc)
    cxx = ["-O3", "-std=c++17"]
    if not use_cuda:
        return CppExtension(
            "taca._C",
            sources=["csrc/bind_torch.cpp"],
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    # Extra nvcc flags for diagnostic builds only, e.g. TACA_NVCC_EXTRA=-DTACA_BWD_TRACE=1 (the v6
    # backward's per-CTA trace, benchmarks/bwd_trace.py); never needed for a normal install.
    nvcc += shlex.split(os.environ.get("TACA_NVCC_EXTRA", ""))
    # The Hopper (wgmma) forward runs only from an sm_90a binary: enable its host dispatch when
    # 9.0a is built and plain 9.0 is not (an H100 could otherwise load the sm_90 image).
    archs = [a.strip() for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")]
    if "9.0a" in archs and "9.0" not in archs and "9.0+PTX" not in archs:
        nvcc.append("-DTACA_HAVE_SM90A=1")
    return CUDAExtension(
        "taca._C",
        sources=["csrc/bind_torch.cpp"] + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=[os.path.join(HERE, "csrc"), os.path.join(HERE, "csrc", "cuda")],
        define_macros=[("TACA_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


use_system_gcc_if_path_gcc_differs()
ext_modules = [numpy_extension()]
cmdclass = {}
try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension

    ext_modules.append(torch_extension())
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
except ImportError:
    print("taca setup: torch not found, building the NumPy binding only", file=sys.stderr)

setup(libraries=libraries, ext_modules=ext_modules, cmdclass=cmdclass)
