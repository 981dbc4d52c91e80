"""Builds the optional extensions from csrc/; everything else is in pyproject.toml.

dgg_kernels._host (CPU C++, csrc/host/): the step's read of the params' gradients and its cache keys in one
C++ pass (dgg_kernels/inputs.py uses the Python form where it is missing).  Built whenever torch is
importable in the build environment and a C++ compiler and Python's headers are there (DGG_NO_CUDA_EXT=1
does not skip it).

dgg_kernels._C (CUDA, the backend="cuda" kernels):

The extension is built only when torch is importable, is a CUDA build, and
nvcc is found.  Otherwise the pure-Python package is installed, and the
backends "triton" and "torch" work as usual; backend="cuda" can then only be
built just in time from csrc/ in a source checkout (an editable install), not
from an installed wheel, which carries no csrc/.  torch must be importable
during the build to get the extension: pip's isolated build environment has no
torch, so install with

    pip install --no-build-isolation -e .

Every build says once (on stderr: `pip install -v` shows it) what was and was
not built.

Environment: DGG_NO_CUDA_EXT=1 skips the extension; TORCH_CUDA_ARCH_LIST, when
set, replaces the default targets (sm_80 and sm_90, plus compute_90 PTX so
newer GPUs can JIT it).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


# Commands that build or install something.  pip runs this file in several
# processes per install (build requirements, metadata, the build itself);
# only the ones that build report, so the report appears once.
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}
# Set once reported: setuptools may execute this file more than once in one
# process, and the processes it starts inherit the environment.
_REPORTED_ENV = "DGG_KERNELS_SETUP_REPORTED"


def _say(msg):
    """Print the build report once per process (and its children), only for commands that build."""
    if os.environ.get(_REPORTED_ENV) == "1" or not _BUILD_COMMANDS.intersection(sys.argv[1:]):
        return
    os.environ[_REPORTED_ENV] = "1"
    # stderr: pip shows a build's stderr with -v, and on failure.
    print(f"dgg-kernels: {msg}", file=sys.stderr, flush=True)


def _not_built_reason():
    """Why the CUDA extension cannot be built here, or None when it can."""
    if os.environ.get("DGG_NO_CUDA_EXT") == "1":
        return "DGG_NO_CUDA_EXT=1 is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as e:  # pip's isolated build env, or a broken torch
        return (
            f"torch is not importable in the build environment ({type(e).__name__}: {e}); "
            "use `pip install --no-build-isolation -e .` with torch installed"
        )
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _host_not_built_reason():
    """Why the CPU extension cannot be built here (no C++ compiler, no Python headers), or None."""
    import sysconfig

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx or not shutil.which(cxx.split()[0]):
        return "no C++ compiler found (set CXX or install g++)"
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers ({include}/Python.h is missing: install python3-dev)"
    return None


def _torch_missing():
    try:
        import torch  # noqa: F401
    except Exception as e:  # pip's isolated build env, or a broken torch
        return f"torch is not importable in the build environment ({type(e).__name__}: {e})"
    return None


def _extension_kwargs():
    missing = _torch_missing()
    if missing is not None:
        _say(f"no extension built: {missing}; use `pip install --no-build-isolation -e .` with torch installed. "
             "The pure-Python package works (backends triton and torch; the host key reads in Python)")
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    csrc = os.path.join(HERE, "csrc")
    exts, said = [], []
    host_missing = _host_not_built_reason()
    if host_missing is None:
        exts.append(CppExtension(name="dgg_kernels._host", sources=["csrc/host/grad_keys.cpp"],
                                 extra_compile_args={"cxx": ["-O3", "-std=c++17"]}))
        said.append("building dgg_kernels._host (CPU C++: the step's gradient reads and cache keys) from csrc/host/")
    else:
        said.append(f"dgg_kernels._host NOT built: {host_missing}; the gate reads its gradients in Python "
                    "(about 150 us more host time per step with 339 params)")
    reason = _not_built_reason()
    if reason is not None:
        said.append(f"CUDA backend (dgg_kernels._C) NOT built: {reason}. The other backends need no build: "
             'backend="triton" (needs the triton package) and backend="torch" work; backend="cuda" '
             "can only be built just in time from csrc/ in a source checkout or editable install, "
             "with a CUDA build of torch, nvcc and ninja; in any other install it is unavailable.")
    else:
        # Relative paths: setuptools rejects absolute source paths in some versions.
        sources = ["csrc/binding.cpp"] + sorted(
            os.path.relpath(p, HERE) for p in glob.glob(os.path.join(csrc, "*", "*.cu"))
        )
        nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc_flags += GENCODE  # an explicit arch flag also stops torch adding its own
        said.append("building the CUDA backend dgg_kernels._C from " + ", ".join(sources)
                    + '; backends "triton" and "torch" are pure Python and need no build')
        exts.append(CUDAExtension(
            name="dgg_kernels._C",
            sources=sources,
            include_dirs=[csrc],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
        ))
    _say("; ".join(said))
    use_ninja = shutil.which("ninja") is not None or _has_ninja_module()
    return {"ext_modules": exts, "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}}


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


setup(**_extension_kwargs())
