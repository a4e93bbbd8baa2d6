"""The module paths of linfusion_ops before it was split into one package per paper, kept as
deprecated aliases for one release.

`import linfusion_ops.training`, `from linfusion_ops import training` and
`linfusion_ops.training` give the module that holds the code now (the same module object) and
emit one DeprecationWarning naming the new path; `python -m linfusion_ops.distill` runs the new
training script. Nothing here imports a feature module before an old path is used.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

# old module path -> the module that holds its code now
MOVED = {
    "linfusion_ops.distill": "linfusion_ops.linfusion.distill",
    "linfusion_ops.training": "linfusion_ops.linfusion.distillation",
    "linfusion_ops.distributed": "linfusion_ops.linfusion.distributed",
    "linfusion_ops.kernel_mlp": "linfusion_ops.linfusion.kernel_mlp",
    "linfusion_ops.long_prompt": "linfusion_ops.longalign.long_prompt",
    "linfusion_ops.longsd": "linfusion_ops.longalign.longsd",
    "linfusion_ops.preference": "linfusion_ops.longalign.preference",
}


def message(old: str) -> str:
    """The deprecation message of an old module path (a key of MOVED)."""
    return f"{old} is deprecated and will be removed in the next release; use {MOVED[old]}"


def moved_module(old: str, stacklevel: int = 2):
    """The module that replaced `old` (a key of MOVED), imported, after a DeprecationWarning
    attributed to the caller's caller (stacklevel as for warnings.warn, counted from the
    caller). Registers it in sys.modules under the old path, so the warning comes once."""
    warnings.warn(message(old), DeprecationWarning, stacklevel=stacklevel + 1)
    module = importlib.import_module(MOVED[old])
    sys.modules[old] = module
    return module


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Finds and loads the old module paths of MOVED: importing one imports its new module,
    warns and binds the new module under the old name; `python -m <old>` runs the new module's
    main()."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        # The import system returns what sys.modules holds under the name after exec_module.
        # warnings skips the import machinery's frames, so stacklevel 2 is the importing line.
        moved_module(module.__name__, stacklevel=2)

    def is_package(self, fullname):
        return False

    def get_source(self, fullname):
        # What `python -m <old path>` runs (runpy reads the code through the loader).
        if fullname not in MOVED:
            raise ImportError(f"{fullname} is not a moved linfusion_ops module", name=fullname)
        new = MOVED[fullname]
        return (
            "import warnings\n"
            f"warnings.warn({message(fullname)!r}, DeprecationWarning)\n"
            "import importlib\n"
            f"_module = importlib.import_module({new!r})\n"
            "if __name__ == '__main__' and hasattr(_module, 'main'):\n"
            "    _module.main()\n"
        )


def install() -> None:
    """Puts MovedModuleFinder on sys.meta_path (once)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
