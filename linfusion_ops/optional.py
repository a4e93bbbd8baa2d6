"""linfusion_ops' optional dependencies: the one-line error that names the extra to install.

`pip install linfusion_ops` brings only torch: the ops (linfusion_ops.linear_attention, ...)
need nothing else. The features need the extras of pyproject.toml (docs/building.md):

    diffusers  diffusers, transformers, safetensors: LinFusion, the long-prompt encoder, highres
    train      + accelerate, datasets: the distillation CLI (linfusion-distill)
    longalign  + peft: LongAlign's LoRA and its fine-tuning CLI (longalign-finetune)
    eval       + datasets, peft: linfusion_ops.evaluation and its CLI (linfusion-eval)

A feature that meets a missing one raises MissingExtraError, a ModuleNotFoundError whose message
is one line: what needed which module, and the `pip install 'linfusion_ops[extra]'` that brings
it. Every feature module imports its optional dependencies inside ``with needs(__name__):``, so
importing it directly (``import linfusion_ops.highres.pipeline``) says the same. This module
imports nothing but the standard library.
"""

import contextlib
import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Callable, Dict, Iterator, Optional, Tuple

# Top-level module of each optional dependency -> the smallest extra that installs it.
EXTRA_OF_MODULE = {
    "diffusers": "diffusers",
    "transformers": "diffusers",
    "safetensors": "diffusers",
    "tokenizers": "diffusers",
    "huggingface_hub": "diffusers",
    "PIL": "diffusers",
    "numpy": "diffusers",
    "tqdm": "diffusers",
    "accelerate": "train",
    "datasets": "train",
    "peft": "longalign",
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def install_hint(extra: str) -> str:
    """The command that installs an extra, e.g. ``pip install 'linfusion_ops[train]'``."""
    return f"pip install 'linfusion_ops[{extra}]'"


def missing_message(feature: str, module: str, extra: Optional[str] = None) -> str:
    """ "<feature> needs <module>, which is not installed: pip install 'linfusion_ops[<extra>]'"
    (extra: default the smallest one that installs the module)."""
    return f"{feature} needs {module}, which is not installed: {install_hint(extra or EXTRA_OF_MODULE[module])}"


@contextlib.contextmanager
def needs(feature: str, extra: Optional[str] = None) -> Iterator[None]:
    """Turns a ModuleNotFoundError of an optional dependency raised inside the block into a
    MissingExtraError with missing_message(feature, module, extra). Errors of other modules (a
    bug, a missing submodule of an installed package) pass through unchanged."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if isinstance(exc, MissingExtraError) or exc.name not in EXTRA_OF_MODULE:
            raise
        raise MissingExtraError(missing_message(feature, exc.name, extra), name=exc.name) from exc


def import_module(name: str, package: Optional[str] = None, extra: Optional[str] = None) -> ModuleType:
    """importlib.import_module(name, package), with a missing optional dependency reported as a
    MissingExtraError naming the module being imported and the extra."""
    feature = importlib.util.resolve_name(name, package) if name.startswith(".") else name
    with needs(feature, extra):
        return importlib.import_module(name, package)


def lazy_getattr(package: str, lazy: Dict[str, str], submodules: Tuple[str, ...] = ()) -> Callable:
    """The module ``__getattr__`` of a package whose public names load on first use.

    ``lazy`` maps each public name to the relative module that defines it (e.g.
    ``{"LinFusion": ".model"}``); the value is bound on the package once loaded. ``submodules``
    are names of submodules returned as modules. Imports go through :func:`import_module`, so a
    missing optional dependency is a one-line MissingExtraError."""

    def __getattr__(name):
        if name in lazy:
            value = getattr(import_module(lazy[name], package), name)
            vars(sys.modules[package])[name] = value
            return value
        if name in submodules:
            return import_module("." + name, package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


@contextlib.contextmanager
def exit_on_missing(feature: str, extra: str) -> Iterator[None]:
    """For a command-line main() (as a decorator or a with block): a missing optional dependency
    ends the program with missing_message(feature, module, extra) on stderr and exit status 1
    instead of a traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name not in EXTRA_OF_MODULE:
            raise
        sys.stderr.write(f"error: {missing_message(feature, exc.name, extra)}\n")
        raise SystemExit(1) from None
