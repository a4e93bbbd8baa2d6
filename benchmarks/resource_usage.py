"""Registers, shared memory and local memory per kernel from the real compiler, for the occupancy
column of benchmarks/bench_emu_profile.py (benchmarks/README.md, "Emulator profile").

    python benchmarks/resource_usage.py --so linfusion_ops/_C*.so          # the built _C's archs
    python benchmarks/resource_usage.py --compile 8.0 [--jobs 2]          # nvcc -cubin per .cu

writes benchmarks/results/resource_usage_sm<arch>.json per arch found:

    {"arch": "sm_90", "source": ..., "nvcc": ..., "kernels": {<demangled name>: {"registers",
     "shared_static", "local", "stack", "constant"}}}

Names are demangled without nvcc's per-file anonymous-namespace tags, so that they equal the
emulator's launch names (linfusion_ops.emulated.launch_log). cuobjdump comes from the toolkit
(CUDA_HOME, PATH) or from triton's bundled copy; nothing here needs a GPU.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def find_tool(name):
    """Path of a CUDA binary tool: CUDA_HOME/bin, PATH, then triton's bundled copy."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    raise SystemExit(f"resource_usage: {name} not found (set CUDA_HOME)")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def normalise(demangled):
    """'void ns::(anonymous namespace)::k<T, 64>(args)' -> 'ns::(anonymous namespace)::k<T, 64>',
    the form of the emulator's launch log."""
    name = demangled
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += name[i] == ")"
            if name[i] == "(":
                depth -= 1
                if depth == 0:
                    name = name[:i]
                    break
    if name.startswith("void "):
        name = name[5:]
    return name


def parse(text, arch=None):
    """{arch: {mangled: {...}}} from cuobjdump --dump-resource-usage (of a module, whose fatbin
    names each arch, or of a cubin of `arch`)."""
    usage = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m and arch and i + 1 < len(lines):
            fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            usage.setdefault(arch, {})[m.group(1)] = {
                "registers": int(fields.get("REG", 0)),
                "shared_static": int(fields.get("SHARED", 0)),
                "local": int(fields.get("LOCAL", 0)),
                "stack": int(fields.get("STACK", 0)),
                "constant": int(fields.get("CONSTANT[0]", 0)),
            }
    return usage


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "?"


def compile_cubins(arch, jobs, workdir):
    """nvcc -cubin of every csrc/cuda/*.cu for sm_<arch> with the flags of setup.py."""
    import torch.utils.cpp_extension as ext

    nvcc = find_tool("nvcc")
    digits = arch.replace(".", "")
    includes = [f"-I{ROOT / 'csrc'}"] + [f"-I{p}" for p in ext.include_paths(device_type="cuda")]
    spec = __import__("importlib.util").util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        includes += [f"-I{d}" for d in sorted(glob.glob(os.path.join(base, "*", "include")))]
    import sysconfig

    includes.append(f"-I{sysconfig.get_paths()['include']}")
    flags = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-std=c++20",
             "-DLINFUSION_OPS_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-gencode=arch=compute_{digits},code=sm_{digits}", "-cubin"]

    def one(source):
        out = Path(workdir) / (Path(source).stem + ".cubin")
        subprocess.run([nvcc, *flags, *includes, source, "-o", str(out)], check=True)
        return str(out)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu"))))), nvcc_version(nvcc)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--so", nargs="*", default=[], help="built modules (or cubins) to read")
    parser.add_argument("--compile", metavar="ARCH", help="compile csrc/cuda/*.cu to cubins for this arch, e.g. 8.0")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    cuobjdump = find_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as workdir:
        files = [(f, None) for f in args.so]
        source, version = "built module", None
        if args.compile:
            cubins, version = compile_cubins(args.compile, args.jobs, workdir)
            files += [(c, "sm_" + args.compile.replace(".", "")) for c in cubins]
            source = "nvcc -cubin per csrc/cuda/*.cu"
        if not files:
            raise SystemExit("resource_usage: give --so and/or --compile")
        usage = {}
        for f, arch in files:
            text = subprocess.run([cuobjdump, "--dump-resource-usage", f], capture_output=True, text=True, check=True).stdout
            for arch, kernels in parse(text, arch).items():
                usage.setdefault(arch, {}).update(kernels)
    os.makedirs(args.out, exist_ok=True)
    for arch, kernels in sorted(usage.items()):
        mangled = sorted(kernels)
        named = {normalise(d): kernels[m] for m, d in zip(mangled, demangle(mangled))}
        path = Path(args.out) / f"resource_usage_{arch.replace('_', '')}.json"
        doc = {"arch": arch, "source": source, "nvcc": version or "see the build of the module",
               "command": " ".join(["python", "benchmarks/resource_usage.py"] + sys.argv[1:]),
               "kernels": dict(sorted(named.items()))}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{path}: {len(named)} kernels")


if __name__ == "__main__":
    main()
