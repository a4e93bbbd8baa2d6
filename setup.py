"""Build linfusion_ops._C with torch.utils.cpp_extension (ninja). The package's metadata (name,
dependencies, extras, entry points) is pyproject.toml's; the version is linfusion_ops/__init__.py's
`__version__`. Beside the compiled module, the build writes linfusion_ops/build_info.json (the
torch and CUDA it was compiled against, the wheel tag), which linfusion_ops reads before it loads
the module.

Environment:
  LINFUSION_OPS_CUDA=0     CPU-only build even when a CUDA toolkit is present.
  LINFUSION_OPS_CUDA_EMU   1: also build linfusion_ops._C_emu, the CUDA kernels compiled by the
                           host compiler against the emulator of csrc/emu/ (no toolkit needed);
                           checked: that and linfusion_ops._C_emu_checked, with the race detector.
  TORCH_CUDA_ARCH_LIST     archs to compile, e.g. "9.0" or "8.0;9.0". Default: the visible GPUs'
                           archs, or "8.0;9.0" (Ampere, Hopper) when no GPU is visible.
  MAX_JOBS                 parallel compile jobs (ninja).
  CUDA_HOME                toolkit root (the folder holding bin/nvcc); found automatically.
"""

import ast
import glob
import json
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_version():
    """linfusion_ops.__version__, read from the source (the package imports torch)."""
    tree = ast.parse((ROOT / "linfusion_ops" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            return ast.literal_eval(node.value)
    raise SystemExit("setup.py: linfusion_ops/__init__.py has no __version__ = '...' line")


VERSION = read_version()
DEFAULT_ARCHS = "8.0;9.0"


def _toolkit_root(nvcc: str):
    """The toolkit folder for an nvcc, following wrapper scripts (`exec /path/to/nvcc "$@"`)."""
    nvcc = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(nvcc))
    if os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")):
        return root
    try:
        text = Path(nvcc).read_text(errors="ignore")[:4096]
    except OSError:
        return None
    match = re.search(r"(/\S+/bin/nvcc)\b", text)
    return _toolkit_root(match.group(1)) if match and match.group(1) != nvcc else None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and os.path.isfile(os.path.join(path, "bin", "nvcc")):
            return path
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root(nvcc)
        if root:
            return root
    for root in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def want_cuda():
    if os.environ.get("LINFUSION_OPS_CUDA", "1") == "0":
        return False, None
    import torch

    if torch.version.cuda is None:
        return False, None
    cuda_home = find_cuda_home()
    return cuda_home is not None, cuda_home


WITH_CUDA, CUDA_HOME = want_cuda()
if WITH_CUDA:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def nvidia_wheel_include_dirs():
    """Headers (cublas_v2.h, cusparse.h, ...) that torch's CUDA headers include and that pip's
    nvidia-* wheels ship instead of the toolkit."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if glob.glob(os.path.join(inc, "cublas*.h")) or glob.glob(os.path.join(inc, "cusparse*.h")):
                dirs.append(inc)
    return dirs


def cuda_archs():
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    archs = sorted({m for f in _get_cuda_arch_flags() for m in re.findall(r"(?:sm|compute)_(\d+a?)", f)})
    return archs


def extensions():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("LINFUSION_OPS_VERSION", f'"{VERSION}"')]
    cxx_flags = ["-O3", "-fopenmp"] if sys.platform != "win32" else ["/O2"]
    if not WITH_CUDA:
        return [CppExtension("linfusion_ops._C", sources, define_macros=define_macros,
                             include_dirs=[str(ROOT / "csrc")], extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])]
    archs = cuda_archs()
    define_macros += [("LINFUSION_OPS_WITH_CUDA", "1"),
                      ("LINFUSION_OPS_CUDA_ARCHS", '"' + ";".join(archs) + '"')]
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
                  f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return [CUDAExtension("linfusion_ops._C", sources, define_macros=define_macros,
                          include_dirs=[str(ROOT / "csrc")] + nvidia_wheel_include_dirs(),
                          extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                          extra_link_args=["-fopenmp"])]


EMU_FLAVOURS = {"0": [], "": [], "1": ["fast"], "checked": ["fast", "checked"]}


def emu_flavours():
    value = os.environ.get("LINFUSION_OPS_CUDA_EMU", "0").strip().lower()
    if value not in EMU_FLAVOURS:
        raise SystemExit(f"LINFUSION_OPS_CUDA_EMU must be 0, 1 or checked, got {value!r}")
    return EMU_FLAVOURS[value]


def emu_units(flavour):
    units = sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/emu/runtime.cpp", "csrc/emu/selftest.cpp",
                                                   "csrc/emu/module.cpp"]
    return units + (["csrc/emu/race_detector.cpp", "csrc/emu/profiler.cpp"] if flavour == "checked" else [])


def emu_extension(flavour):
    """linfusion_ops._C_emu[_checked]: every translation unit of csrc/cuda plus the emulator, by the
    host compiler. Each unit is compiled through a one-line wrapper under build/ (one folder per
    flavour, so that the flavours' objects differ and ninja rebuilds only the units that changed)."""
    suffix = "" if flavour == "fast" else "_" + flavour
    wrappers = ROOT / "build" / "emu_sources" / flavour
    wrappers.mkdir(parents=True, exist_ok=True)
    sources = []
    for unit in emu_units(flavour):
        wrapper = wrappers / (Path(unit).stem + ".cpp")
        text = f'#include "{ROOT / unit}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper.relative_to(ROOT)))
    flags = ["-std=c++20", "-fvisibility=hidden", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
             "-DLINFUSION_OPS_EMU", f"-DLINFUSION_OPS_EMU_NAMESPACE=linfusion_ops_emu{suffix}"]
    if flavour == "checked":
        # The kernels' memory accesses call the __tsan_* hooks of race_detector.cpp (not libtsan).
        flags += ["-O1", "-g1", "-fsanitize=thread", "-DLINFUSION_OPS_EMU_CHECKED"]
    else:
        flags += ["-O2", "-g0"]  # no debug info: a third of the compile time
    return CppExtension(f"linfusion_ops._C_emu{suffix}", sources,
                        include_dirs=[str(ROOT / "csrc" / "emu" / "include"), str(ROOT / "csrc")],
                        extra_compile_args={"cxx": flags})


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """build_ext that also writes build_info.json beside linfusion_ops._C (in place or into the
    wheel's tree)."""

    def run(self):
        super().run()
        wheel = self.distribution.get_command_obj("bdist_wheel")
        wheel.ensure_finalized()
        info = {
            "version": VERSION,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda": WITH_CUDA,
            "archs": cuda_archs() if WITH_CUDA else [],
            "wheel_tag": "-".join(wheel.get_tag()),
        }
        target = Path(self.get_ext_fullpath("linfusion_ops._C")).with_name("build_info.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(info, indent=1) + "\n")


setup(
    version=VERSION,
    packages=find_packages(include=["linfusion_ops", "linfusion_ops.*"]),
    ext_modules=extensions() + [emu_extension(f) for f in emu_flavours()],
    cmdclass={"build_ext": BuildExt},
)
