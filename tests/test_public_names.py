"""The public names of linfusion_ops and its packages: each resolves lazily to the object of the
module that defines it, importing the package imports no feature module, and the module paths
of the flat layout are deprecated aliases of the modules that hold their code now."""

import importlib
import json
import subprocess
import sys
import warnings

import pytest

import linfusion_ops
from linfusion_ops import _deprecated

PACKAGES = ("linfusion_ops", "linfusion_ops.linfusion", "linfusion_ops.longalign")


def needs_feature_dependencies():
    for name in ("diffusers", "transformers", "peft", "accelerate"):
        pytest.importorskip(name)


def test_importing_the_packages_loads_no_feature_module():
    script = (
        "import json, sys\n"
        "import linfusion_ops, linfusion_ops.linfusion, linfusion_ops.longalign, linfusion_ops.highres\n"
        "heavy = ('diffusers', 'transformers', 'accelerate', 'peft')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "    or m.count('.') >= 2 and m.startswith('linfusion_ops.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves_to_its_module_object(package):
    needs_feature_dependencies()
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        if isinstance(value, type(module)):
            assert value.__name__ == f"{package}.{name}"
            continue
        home = getattr(value, "__module__", None)
        if home is not None and home.startswith("linfusion_ops"):
            assert getattr(sys.modules[home], name) is value, f"{package}.{name}"


def test_submodules_and_unknown_names():
    needs_feature_dependencies()
    from linfusion_ops import linfusion, longalign

    assert linfusion.distill is sys.modules["linfusion_ops.linfusion.distill"]
    assert longalign.finetune is sys.modules["linfusion_ops.longalign.finetune"]
    assert linfusion_ops.highres is sys.modules["linfusion_ops.highres"]
    for module in (linfusion_ops, linfusion, longalign):
        with pytest.raises(AttributeError, match=rf"^module '{module.__name__}' has no attribute 'no_such_name'$"):
            getattr(module, "no_such_name")


@pytest.fixture
def forget_old_paths(monkeypatch):
    """Removes the old module paths from sys.modules and the package, so that each use warns."""
    for old in _deprecated.MOVED:
        monkeypatch.delitem(sys.modules, old, raising=False)
        if old.rpartition(".")[2] in vars(linfusion_ops):
            monkeypatch.delattr(linfusion_ops, old.rpartition(".")[2])


@pytest.mark.parametrize("old", sorted(_deprecated.MOVED))
def test_old_module_paths_warn_and_give_the_new_module(old, forget_old_paths):
    needs_feature_dependencies()
    new = importlib.import_module(_deprecated.MOVED[old])
    short = old.rpartition(".")[2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert getattr(linfusion_ops, short) is new
    assert [(w.category, str(w.message), w.filename) for w in caught] == [
        (DeprecationWarning, f"{old} is deprecated and will be removed in the next release; use {new.__name__}", __file__)
    ]
    assert sys.modules[old] is new


def test_old_module_path_import_statement(forget_old_paths):
    needs_feature_dependencies()
    # An import statement compiled from a string: the repository's own code names no old path
    # (tests/test_package_structure.py checks that).
    namespace = {}
    statement = compile("import linfusion_ops.longsd as old", __file__, "exec")
    with pytest.warns(DeprecationWarning, match=r"^linfusion_ops\.longsd is deprecated .* use linfusion_ops\.longalign\.longsd$") as caught:
        exec(statement, namespace)
    assert namespace["old"] is sys.modules["linfusion_ops.longalign.longsd"]
    assert [w.filename for w in caught] == [__file__]
