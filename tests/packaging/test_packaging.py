"""The installed package as a user meets it: metadata from one place, the console entry points'
--help and their one-line errors without the optional dependencies (a meta-path blocker in a
sitecustomize.py hides them from a subprocess), the library's error naming the extra, and the
clear message when the compiled module was built against another torch."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import linfusion_ops
from linfusion_ops import _library, optional

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
# Every optional dependency, and numpy / PIL / tqdm: torch does not bring them either.
OPTIONAL_MODULES = sorted(optional.EXTRA_OF_MODULE) + ["matplotlib"]

BLOCKER = '''
import sys

BLOCKED = {blocked!r}


class Blocker:
    """Makes `import <blocked>` (and its submodules) raise ModuleNotFoundError, as if the
    package were not installed."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{top!r}}", name=top)
        return None


sys.meta_path.insert(0, Blocker())
'''


def run_python(code, tmp_path, blocked=(), cwd=None, extra_path=(ROOT,)):
    """Runs `python -c code` with the modules `blocked` hidden; returns the CompletedProcess."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(blocked)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *map(str, extra_path)]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=cwd or tmp_path, timeout=600)


def run_entry_point(script, args, tmp_path, blocked):
    """What the console script `script` of pyproject.toml does: `sys.exit(main())` with argv."""
    module, _, function = SCRIPTS[script].partition(":")
    return run_python(f"""
        import sys
        from {module} import {function}
        sys.argv = [{script!r}, *{list(args)!r}]
        sys.exit({function}())
    """, tmp_path, blocked)


def test_version_comes_from_one_place():
    assert "version" in PYPROJECT["project"]["dynamic"] and "version" not in PYPROJECT["project"]
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, LINFUSION_OPS_CUDA="0", LINFUSION_OPS_CUDA_EMU="0"), timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == linfusion_ops.__version__


def test_extras_and_requirements_dev_agree():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"diffusers", "train", "longalign", "eval", "dev"} <= set(extras)
    # Every extra an error message names exists.
    assert set(optional.EXTRA_OF_MODULE.values()) <= set(extras)
    out = subprocess.run([sys.executable, "scripts/requirements.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_entry_point_help_without_optional_dependencies(script, tmp_path):
    out = run_entry_point(script, ["--help"], tmp_path, blocked=OPTIONAL_MODULES)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {script}"), out.stdout[:200]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("script, args, blocked, extra", [
    ("linfusion-distill", ["--pretrained_model_name_or_path", "sd", "--train_data_dir", "data", "--output_dir", "out"],
     "accelerate", "train"),
    ("longalign-finetune", ["--pretrained_model", "sd", "--preference_model", "pm", "--prompts", "p.txt",
                            "--output_dir", "out"], "peft", "longalign"),
    ("linfusion-eval", ["generate", "--pipeline", "sd", "--captions", "captions.txt", "--outdir", "out"],
     "diffusers", "eval"),
])
def test_entry_point_names_the_missing_extra_in_one_line(script, args, blocked, extra, tmp_path):
    (tmp_path / "captions.txt").write_text("a red square\n")
    out = run_entry_point(script, args, tmp_path, blocked=[blocked])
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stderr.strip().splitlines() == [
        f"error: {script} needs {blocked}, which is not installed: pip install 'linfusion_ops[{extra}]'"
    ]


def test_library_names_the_missing_extra(tmp_path):
    out = run_python("""
        import linfusion_ops
        import linfusion_ops.highres as highres
        print(highres.plan_stages.__name__)  # the stage plans need no diffusers
        for get in (lambda: highres.LinFusionHighResPipeline, lambda: linfusion_ops.LinFusion,
                    lambda: linfusion_ops.longalign.LongPromptEncoder):
            try:
                get()
            except linfusion_ops.optional.MissingExtraError as error:
                assert isinstance(error, ModuleNotFoundError) and error.name == "diffusers"
                print(error)
    """, tmp_path, blocked=["diffusers"])
    assert out.returncode == 0, out.stderr
    hint = "needs diffusers, which is not installed: pip install 'linfusion_ops[diffusers]'"
    assert out.stdout.splitlines() == [
        "plan_stages",
        f"linfusion_ops.highres.pipeline {hint}",
        f"linfusion_ops.linfusion.model {hint}",
        f"linfusion_ops.longalign.long_prompt {hint}",
    ]


def optional_imports(tree):
    """(line, top-level module, inside `with needs(...)`) of every module-level import of an optional
    dependency in a parsed source file (TYPE_CHECKING blocks excluded)."""
    found = []

    def visit(body, guarded):
        for node in body:
            if isinstance(node, ast.With):
                calls = [item.context_expr for item in node.items]
                visit(node.body, guarded or any(isinstance(c, ast.Call) and getattr(c.func, "id", "") == "needs"
                                                for c in calls))
            elif isinstance(node, ast.Try):
                visit(node.body, guarded)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                if isinstance(node, ast.ImportFrom) and node.level:
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                found.extend([(node.lineno, n.partition(".")[0], guarded) for n in names
                              if n.partition(".")[0] in optional.EXTRA_OF_MODULE])

    visit(tree.body, False)
    return found


FEATURE_MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for path in (ROOT / "linfusion_ops").rglob("*.py")
    if optional_imports(ast.parse(path.read_text())))


def test_feature_modules_import_optional_dependencies_under_needs():
    assert "linfusion_ops.highres.pipeline" in FEATURE_MODULES and len(FEATURE_MODULES) >= 9, FEATURE_MODULES
    bare = [(name, line, module) for name in FEATURE_MODULES
            for line, module, guarded in optional_imports(ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text()))
            if not guarded]
    assert not bare, f"module-level imports of optional dependencies outside `with needs(__name__):` {bare}"


def test_direct_import_of_a_feature_module_names_the_extra(tmp_path):
    out = run_python(f"""
        import importlib
        import linfusion_ops.optional as optional
        for name in {FEATURE_MODULES!r}:
            try:
                importlib.import_module(name)
            except optional.MissingExtraError as error:
                print(name, "|", error)
            else:
                print(name, "| imported")
    """, tmp_path, blocked=OPTIONAL_MODULES)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" | ") for line in out.stdout.splitlines())
    assert sorted(lines) == FEATURE_MODULES
    pattern = re.compile(r"(linfusion_ops\.[\w.]+) needs (\w+), which is not installed: "
                         r"pip install 'linfusion_ops\[(\w+)\]'")
    for name, message in lines.items():
        match = pattern.fullmatch(message)
        assert match, (name, message)
        # the module itself, or a feature module it imports, names a module of that extra
        assert match.group(1) in FEATURE_MODULES and match.group(2) in optional.EXTRA_OF_MODULE, (name, message)
    assert lines["linfusion_ops.highres.pipeline"].startswith("linfusion_ops.highres.pipeline needs PIL")
    assert lines["linfusion_ops.evaluation.metrics"].endswith("[eval]'")


def test_other_import_errors_pass_through():
    with pytest.raises(ModuleNotFoundError) as caught:
        with optional.needs("feature"):
            import linfusion_ops_no_such_module  # noqa: F401
    assert not isinstance(caught.value, optional.MissingExtraError)


def test_torch_mismatch_message():
    recorded = {"torch": "2.14.1+cu130", "torch_cuda": "13.0"}
    assert _library.torch_mismatch(recorded, "2.14.1+cu130", "13.0") is None
    assert _library.torch_mismatch(recorded, "2.14.1", "13.0") is None  # PyPI's name of the same build
    assert _library.torch_mismatch({}, "2.3.0", None) is None  # nothing recorded (CMake build)
    message = _library.torch_mismatch(recorded, "2.13.0+cpu", None)
    assert message.startswith("linfusion_ops._C was built against torch 2.14.1+cu130 (CUDA 13.0) but torch "
                              "2.13.0+cpu (CUDA none) is installed")
    assert "\n" not in message
    assert _library.torch_mismatch(recorded, "2.14.1+cpu", None) is not None


@pytest.mark.skipif(not linfusion_ops.compiled(), reason="linfusion_ops._C is not built")
def test_import_under_another_torch_warns_and_falls_back(tmp_path):
    """A copy of the package whose build record names another torch: the import warns with
    both versions, does not load _C, and the ops run the reference implementations."""
    package = tmp_path / "installed" / "linfusion_ops"
    shutil.copytree(ROOT / "linfusion_ops", package, ignore=shutil.ignore_patterns("__pycache__", "_C_emu*"))
    (package / "build_info.json").write_text(json.dumps({"torch": "1.13.1+cu117", "torch_cuda": "11.7",
                                                         "wheel_tag": "cp311-cp311-linux_x86_64"}))
    out = run_python("""
        import warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import linfusion_ops
        from linfusion_ops import reference
        print([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
        info = linfusion_ops.build_info()
        assert not linfusion_ops.compiled() and not info["compiled"], info
        assert info["built_against"]["torch"] == "1.13.1+cu117"
        q, k, v = torch.randn(3, 1, 5, 6, dtype=torch.float64)
        torch.testing.assert_close(linfusion_ops.linear_attention(q, k, v, 2), reference.linear_attention(q, k, v, 2))
        print(linfusion_ops.__file__)
    """, tmp_path, extra_path=[tmp_path / "installed"])
    assert out.returncode == 0, out.stderr
    warnings_line, location = out.stdout.splitlines()
    assert Path(location).parent == package
    assert "built against torch 1.13.1+cu117 (CUDA 11.7) but torch " in warnings_line
    import torch

    assert f"torch {torch.__version__}" in warnings_line
    assert "undefined symbol" not in out.stderr
