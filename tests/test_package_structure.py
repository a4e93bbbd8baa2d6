"""The repository's structure, read from the sources with `ast` and regular expressions (nothing
of linfusion_ops is imported, so these checks run without the compiled module or diffusers).

Each check is a function over a directory, run on the repository and, as its mutation proof, on
a tiny synthetic tree in tmp_path that breaks the rule, so that the check is shown to fail.

Rules, and how the corner cases count:

* Import cycles (`import_cycles`). A module imports another when it holds an `import` or
  `from ... import` statement naming it, anywhere in the file: at module level, in a function
  body (run later, but a cycle broken only by deferring one import is still a cycle), under
  `if TYPE_CHECKING:`. Relative imports are resolved against the module's package.
  `from pkg.a import b` imports `pkg.a`, and also `pkg.a.b` when that is a module. Importing a
  module runs its parent packages' `__init__` first; those implicit edges are not counted (a
  submodule that names nothing of its package's `__init__` cannot deadlock on it).
  `importlib.import_module(...)` calls (the lazy `__getattr__` of the packages, the loading of
  the compiled modules) are not import statements and are not counted.
* Imports resolve (`unresolved_imports`): every module of the package that the package, tests,
  scripts or benchmarks import exists; the old module paths kept as deprecated aliases are not
  modules, so the repository's own code cannot use them.
* Private names (`private_name_uses`). `from m import _x` and `m._x`, where `m` is a module of
  the package bound by an import and `_x` is not a dunder, are errors unless `m` is the module
  itself. Importing a private *module* (`from . import _deprecated`, `from ._library import
  compiled`, the compiled extensions `_C*` declared in setup.py) is not importing a private name:
  the underscore says the module is not public API, and the package's own modules may use its
  public names. A private name of a private module is as private as any other.
* The op layer (`heavy_imports`): ops, reference, _library and emulated (and the torch-only
  helpers _deprecated, optional, distributed_utils) import none of diffusers, transformers,
  accelerate, peft: anywhere in their own files, or at module level in any package module that
  importing them runs (their module-level package imports, followed transitively, and the
  parent packages' `__init__`).
* Cited paths (`missing_cited_paths`): a path that starts with one of the repository's top
  folders (docs/, benchmarks/, tests/, scripts/, csrc/, linfusion_ops/) in any text file of
  SCANNED (code, tests, scripts, benchmarks, csrc, build files, README.md, docs/) exists. `*` is
  a glob (it must match a file); a path cut short by a placeholder (`<arch>`, an f-string's
  `{name}`) must be the prefix of an entry of its folder; paths that .gitignore ignores are build
  or benchmark outputs, not cited files; EXAMPLE_PATHS are the files csrc/README.md's recipe
  tells a new op to add.
* Mentions (`forbidden_mentions`): no issue numbers (the word issue followed by a number, or a
  hash sign followed by digits in prose) and no mention of the design, emulation or style notes
  that live outside the repository, in any text file of the repository (what .gitignore ignores
  is not part of it).
* Tests (`imports_of_test_files`): no test file imports another test module (`test_*.py`,
  `*_test.py`) or a conftest; shared helpers live in tests/helpers/.
"""

import ast
import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "linfusion_ops"
# The op layer, and the torch-only helpers the package and its features share.
OP_LAYER = ("ops", "reference", "_library", "emulated", "_deprecated", "optional", "distributed_utils")
HEAVY = ("diffusers", "transformers", "accelerate", "peft")
CITED_ROOTS = ("docs", "benchmarks", "tests", "scripts", "csrc", "linfusion_ops")
# Where cited paths are looked for: code, tests, scripts, benchmarks, csrc, the build files and
# the documentation.
SCANNED = (
    "linfusion_ops", "tests", "scripts", "benchmarks", "csrc", ".ci",
    "setup.py", "CMakeLists.txt", "pyproject.toml", "pytest.ini", "requirements-dev.txt",
    "README.md", "docs",
)
EXAMPLE_PATHS = {"csrc/cpu/my_op.cpp", "csrc/cuda/my_op.cu", "tests/ops/test_my_op.py"}


# ---------------------------------------------------------------------------------------------
# The package's modules and their imports


@dataclass
class Import:
    target: str  # the module imported (dotted, inside the package)
    names: Tuple[str, ...]  # for `from target import a, b`: the names taken from it (not modules)
    line: int
    module_level: bool


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: List[Import] = field(default_factory=list)
    external: List[Tuple[str, int, bool]] = field(default_factory=list)  # (top name, line, module_level)
    aliases: Dict[str, str] = field(default_factory=dict)  # local name -> package module it is bound to


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not _is_dunder(name)


def load_package(root: Path, package: str = PACKAGE) -> Dict[str, Module]:
    """Every module of `root/package` (dotted name -> Module) with its imports resolved. Compiled
    extensions named in root/setup.py as "package.<name>" count as modules without a source."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = Module(name, path, is_package, ast.parse(path.read_text(), filename=str(path)))
    setup = root / "setup.py"
    if setup.is_file():
        for name in re.findall(rf"[\"']({re.escape(package)}\.\w+)[\"']", setup.read_text()):
            modules.setdefault(name, Module(name, setup, False, ast.Module(body=[], type_ignores=[])))
    for module in modules.values():
        _collect_imports(module, package, set(modules))
    return modules


def _collect_imports(module: Module, package: str, known: Set[str]) -> None:
    own_package = module.name if module.is_package else module.name.rpartition(".")[0]

    def resolve(base: Optional[str], level: int) -> str:
        if level == 0:
            return base
        anchor = own_package.split(".")
        anchor = anchor[: len(anchor) - (level - 1)]
        return ".".join(anchor + ([base] if base else []))

    def inside(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not inside(alias.name):
                    module.external.append((alias.name.split(".")[0], node.lineno, module_level))
                    continue
                module.imports.append(Import(alias.name, (), node.lineno, module_level))
                if alias.asname:
                    module.aliases[alias.asname] = alias.name
                else:
                    module.aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.module, node.level)
            if not inside(base):
                module.external.append((base.split(".")[0], node.lineno, module_level))
            else:
                names = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in known:
                        module.imports.append(Import(sub, (), node.lineno, module_level))
                        module.aliases[alias.asname or alias.name] = sub
                    elif alias.name != "*":
                        names.append(alias.name)
                if names or all(f"{base}.{a.name}" not in known for a in node.names):
                    module.imports.append(Import(base, tuple(names), node.lineno, module_level))
        for child in ast.iter_child_nodes(node):
            visit(child, module_level)

    visit(module.tree, True)


# ---------------------------------------------------------------------------------------------
# (a) import cycles


def import_cycles(modules: Dict[str, Module]) -> List[str]:
    """One line per import cycle (strongly connected component of the import graph): the cycle's
    path, each step with the file and line of its import statement."""
    edges: Dict[str, Dict[str, int]] = {name: {} for name in modules}
    for module in modules.values():
        for imp in module.imports:
            if imp.target in modules and imp.target != module.name:
                edges[module.name].setdefault(imp.target, imp.line)

    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            strongconnect(v)

    cycles = []
    for component in components:
        start, members = component[0], set(component)
        # Shortest way round from start back to start inside the component.
        previous = {start: None}
        queue = [start]
        end = None
        while queue and end is None:
            v = queue.pop(0)
            for w in sorted(edges[v]):
                if w == start:
                    end = v
                    break
                if w in members and w not in previous:
                    previous[w] = v
                    queue.append(w)
        path = [start]
        v = end
        while v != start:
            path.insert(1, v)
            v = previous[v]
        path.append(start)
        steps = [f"{a} ({modules[a].path.name}:{edges[a][b]})" for a, b in zip(path, path[1:])]
        cycles.append(" -> ".join(steps + [start]))
    return cycles


def unresolved_imports(root: Path, package: str = PACKAGE, under: Sequence[str] = ()) -> List[str]:
    """`file:line: module` for every import of a module of the package that does not exist
    (`import package.x`, `from package.x import y`, relative imports inside the package), in the
    package and in the Python files below root/<each of under>. The old module paths kept as
    deprecated aliases count as missing: the repository's own code uses the new ones."""
    modules = load_package(root, package)
    found = []
    for entry in (package, *under):
        for path in sorted((root / entry).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            module = modules.get(name)
            if module is None or module.path != path:
                module = Module(name, path, is_package, ast.parse(path.read_text(), filename=str(path)))
                _collect_imports(module, package, set(modules))
            relative = path.relative_to(root).as_posix()
            found += [f"{relative}:{imp.line}: {imp.target}" for imp in module.imports if imp.target not in modules]
    return found


# ---------------------------------------------------------------------------------------------
# (b) private names across modules


def _dotted(node: ast.AST) -> Optional[List[str]]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts
    return None


def private_name_uses(modules: Dict[str, Module]) -> List[str]:
    """`module (file:line): name` for every private name of a package module used by another
    module (`from m import _x`, `m._x`)."""
    found = []
    for module in modules.values():
        where = f"{module.name} ({module.path.name}"
        for imp in module.imports:
            if imp.target == module.name:
                continue
            for name in imp.names:
                if _is_private(name):
                    found.append(f"{where}:{imp.line}): from {imp.target} import {name}")
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.Attribute) or isinstance(getattr(node, "ctx", None), ast.Del):
                continue
            parts = _dotted(node)
            if not parts or parts[0] not in module.aliases:
                continue
            current = module.aliases[parts[0]]
            for attr in parts[1:]:
                if f"{current}.{attr}" in modules:
                    current = f"{current}.{attr}"
                    continue
                if _is_private(attr) and current != module.name:
                    found.append(f"{where}:{node.lineno}): {current}.{attr}")
                break
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------
# (c) the op layer needs only torch


def heavy_imports(
    modules: Dict[str, Module], package: str = PACKAGE, op_layer: Sequence[str] = OP_LAYER,
    heavy: Sequence[str] = HEAVY,
) -> List[str]:
    """One line per import of a `heavy` package that importing an op-layer module runs (or that
    the op-layer module makes anywhere), with the chain of package imports that leads to it."""
    found = []
    for start in (f"{package}.{name}" for name in op_layer):
        if start not in modules:
            continue
        via = {start: None}
        queue = [start]
        while queue:
            v = queue.pop(0)
            parents = v.split(".")
            reached = [".".join(parents[:i]) for i in range(1, len(parents))]
            reached += [imp.target for imp in modules[v].imports if imp.module_level]
            for w in reached:
                if w in modules and w not in via:
                    via[w] = v
                    queue.append(w)
        for v in via:
            for top, line, module_level in modules[v].external:
                if top in heavy and (module_level or v == start):
                    chain, u = [], v
                    while u is not None:
                        chain.insert(0, u)
                        u = via[u]
                    found.append(f"{' -> '.join(chain)} -> {top} ({modules[v].path.name}:{line})")
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------
# Files of the repository


def _ignore_patterns(root: Path) -> List[str]:
    gitignore = root / ".gitignore"
    if not gitignore.is_file():
        return []
    lines = (line.strip() for line in gitignore.read_text().splitlines())
    return [line for line in lines if line and not line.startswith(("#", "!"))]


def is_ignored(relative: str, patterns: Sequence[str]) -> bool:
    """Whether .gitignore's `patterns` (the simple forms: `name`, `*.ext`, `dir/`, `a/b/`) ignore
    the repository path `relative` (a folder ignored ignores everything below it)."""
    parts = relative.strip("/").split("/")
    for pattern in patterns:
        directory = pattern.endswith("/")
        pattern = pattern.strip("/")
        if "/" in pattern:
            depth = pattern.count("/") + 1
            if len(parts) >= depth and fnmatch.fnmatch("/".join(parts[:depth]), pattern):
                if directory or len(parts) == depth:
                    return True
        elif any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


def text_files(root: Path, under: Sequence[str] = ("",)) -> Iterator[Tuple[str, str]]:
    """(repository path, text) of every text file at or below root/<each of under> (files or
    folders), skipping .git, what .gitignore ignores and binary files."""
    patterns = _ignore_patterns(root)

    def keep(relative: str) -> bool:
        return relative.split("/")[0] != ".git" and not is_ignored(relative, patterns)

    for entry in under:
        base = root / entry
        if base.is_file():
            paths = [base]
        else:
            paths = []
            for folder, dirs, files in os.walk(base):
                here = Path(folder)
                dirs[:] = sorted(d for d in dirs if keep((here / d).relative_to(root).as_posix()))
                paths += [here / f for f in sorted(files)]
        for path in paths:
            relative = path.relative_to(root).as_posix()
            if not keep(relative):
                continue
            data = path.read_bytes()
            if b"\0" in data:
                continue
            try:
                yield relative, data.decode("utf-8")
            except UnicodeDecodeError:
                continue


# ---------------------------------------------------------------------------------------------
# (d) cited paths exist

_CITED = re.compile(r"(?<![\w./\-])((?:%s)/[\w./*\-]*)([<{]?)" % "|".join(map(re.escape, CITED_ROOTS)))


def missing_cited_paths(
    root: Path, scanned: Sequence[str] = SCANNED, examples: Set[str] = frozenset(EXAMPLE_PATHS),
) -> List[str]:
    """`file:line: path` for every repository path cited in the scanned files that does not exist."""
    patterns = _ignore_patterns(root)
    missing = []
    for relative, text in text_files(root, scanned):
        for number, line in enumerate(text.splitlines(), 1):
            for match in _CITED.finditer(line):
                path, placeholder = match.group(1).rstrip("."), match.group(2)
                if path in examples or is_ignored(path, patterns):
                    continue
                if placeholder:
                    folder, _, stem = path.rpartition("/")
                    ok = (root / folder).is_dir() and any(p.name.startswith(stem) for p in (root / folder).iterdir())
                elif "*" in path:
                    ok = any(root.glob(path))
                else:
                    ok = (root / path).exists()
                if not ok:
                    missing.append(f"{relative}:{number}: {path}{placeholder}")
    return missing


# ---------------------------------------------------------------------------------------------
# (e) no issue numbers, no notes from outside the repository

_MENTIONS = (
    (re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE), "issue number"),
    (re.compile(r"(?<![\w&#/$])#\d+\b"), "issue number"),
    (re.compile(r"\b(?:DESIGN|EMULATION|STYLE)\.md\b"), "note outside the repository"),
)


def forbidden_mentions(root: Path) -> List[str]:
    """`file:line: what: text` for every issue number and every mention of the notes that are
    not in the repository, in any text file of the repository."""
    found = []
    for relative, text in text_files(root):
        for number, line in enumerate(text.splitlines(), 1):
            for pattern, what in _MENTIONS:
                for match in pattern.finditer(line):
                    found.append(f"{relative}:{number}: {what}: {match.group(0)}")
    return found


# ---------------------------------------------------------------------------------------------
# (f) tests import helpers, never other tests

_TEST_MODULE = re.compile(r"^(test_\w*|\w+_test|conftest)$")


def imports_of_test_files(root: Path, tests: str = "tests") -> List[str]:
    """`file:line: module` for every import, in a Python file under root/tests, of a test module
    or a conftest (absolute, relative, or `from package import test_x`)."""
    found = []
    for path in sorted((root / tests).rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                targets = [base] + [f"{base.rstrip('.')}.{alias.name}" if node.module else base + alias.name
                                    for alias in node.names]
            else:
                continue
            for target in targets:
                if any(_TEST_MODULE.match(part) for part in target.split(".") if part):
                    found.append(f"{relative}:{node.lineno}: {target}")
                    break
    return found


# ---------------------------------------------------------------------------------------------
# The checks on the repository


def _report(problems: List[str]) -> str:
    return "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles(load_package(REPO))
    assert not cycles, "import cycles:\n" + _report(cycles)


def test_package_imports_resolve():
    found = unresolved_imports(REPO, under=("tests", "scripts", "benchmarks"))
    assert not found, "imports of package modules that do not exist (or old module paths):\n" + _report(found)


def test_no_private_names_across_modules():
    uses = private_name_uses(load_package(REPO))
    assert not uses, "private names used across modules:\n" + _report(uses)


def test_op_layer_imports_only_torch():
    modules = load_package(REPO)
    assert all(f"{PACKAGE}.{name}" in modules for name in OP_LAYER), sorted(modules)
    found = heavy_imports(modules)
    assert not found, "the op layer imports:\n" + _report(found)


def test_cited_paths_exist():
    missing = missing_cited_paths(REPO)
    assert not missing, "cited paths that do not exist:\n" + _report(missing)


def test_no_issue_numbers_or_outside_notes():
    found = forbidden_mentions(REPO)
    assert not found, _report(found)


def test_tests_do_not_import_tests():
    found = imports_of_test_files(REPO)
    assert not found, "test files importing test files or conftest (move the helper to tests/helpers/):\n" + _report(found)


def test_the_checks_read_the_whole_package():
    # Guards the checks above against passing because they read nothing.
    modules = load_package(REPO)
    assert {f"{PACKAGE}.{name}" for name in ("linfusion.model", "longalign.preference", "highres.pipeline")} <= set(modules)
    preference = modules[f"{PACKAGE}.longalign.preference"]
    assert any(imp.target == f"{PACKAGE}.longalign.long_prompt" for imp in preference.imports)
    assert any(top == "transformers" and not level for top, _, level in preference.external)
    assert sum(1 for _ in text_files(REPO, SCANNED)) > 100


# ---------------------------------------------------------------------------------------------
# Mutation proofs: each checker fails on a synthetic tree that breaks its rule


def _write(root: Path, files: Dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cycle_check_finds_function_local_and_relative_cycles(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .sub import b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def f():\n    from ..c import g\n    return g\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from . import c\n",
    })
    assert import_cycles(load_package(root, "pkg")) == [
        "pkg.a (a.py:1) -> pkg.sub.b (b.py:2) -> pkg.c (c.py:1) -> pkg.a"
    ]
    (root / "pkg/sub/b.py").write_text("def f():\n    return 1\n")
    assert import_cycles(load_package(root, "pkg")) == []


def test_cycle_check_counts_from_package_import_module(tmp_path):
    # `from . import b` inside pkg.a names the module pkg.b, which imports a name of pkg.a.
    root = _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from . import b\nX = 1\n", "pkg/b.py": "from .a import X\n"})
    assert import_cycles(load_package(root, "pkg")) == ["pkg.a (a.py:1) -> pkg.b (b.py:1) -> pkg.a"]


def test_unresolved_import_check(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "from . import a\n",
        "pkg/a.py": "from .gone import x\nfrom . import b\n\ndef f():\n    import pkg.sub.old\n",
        "pkg/b.py": "",
        "pkg/sub/__init__.py": "",
        "suite/test_x.py": "import pkg.a\nfrom pkg.sub import anything\nfrom pkg.moved import y\nfrom .helpers import z\n",
    })
    assert unresolved_imports(root, "pkg", under=("suite",)) == [
        "pkg/a.py:1: pkg.gone",
        "pkg/a.py:5: pkg.sub.old",
        "suite/test_x.py:3: pkg.moved",
    ]


def test_private_name_check(tmp_path):
    root = _write(tmp_path, {
        "setup.py": "Extension('pkg._C', [])\n",
        "pkg/__init__.py": "from . import _helpers, _C\nfrom ._helpers import public\n",
        "pkg/_helpers.py": "def public(): ...\ndef _private(): ...\nx = _private.__name__\n",
        "pkg/a.py": "from ._helpers import _private\n",
        "pkg/b.py": "from . import _helpers\nimport pkg.sub.c\ny = _helpers._private\nz = pkg.sub.c._hidden\n"
                    "ok = _helpers.public.__doc__, pkg.sub.c.__name__\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import pkg.sub.c as me\n_hidden = 1\nw = me._hidden\n",
    })
    assert private_name_uses(load_package(root, "pkg")) == [
        "pkg.a (a.py:1): from pkg._helpers import _private",
        "pkg.b (b.py:3): pkg._helpers._private",
        "pkg.b (b.py:4): pkg.sub.c._hidden",
    ]


def test_heavy_import_check(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/ops.py": "import torch\nfrom . import mid\n\ndef f():\n    import transformers\n",
        "pkg/mid.py": "from .feature import thing\n\ndef g():\n    import peft\n",
        "pkg/feature/__init__.py": "",
        "pkg/feature/thing.py": "import diffusers.models\n",
        "pkg/reference.py": "import torch\n",
    })
    found = heavy_imports(load_package(root, "pkg"), "pkg", op_layer=("ops", "reference"))
    assert found == [
        "pkg.ops -> pkg.mid -> pkg.feature.thing -> diffusers (thing.py:1)",
        "pkg.ops -> transformers (ops.py:5)",
    ]
    # A parent package's __init__ runs on import too.
    (root / "pkg/__init__.py").write_text("import accelerate\n")
    assert "pkg.reference -> pkg -> accelerate (__init__.py:1)" in heavy_imports(
        load_package(root, "pkg"), "pkg", op_layer=("reference",))


def test_cited_path_check(tmp_path):
    # The folder names are joined at run time, so that this file cites none of these paths.
    docs, bench, csrc, tests = "do" + "cs", "bench" + "marks", "cs" + "rc", "te" + "sts"
    root = _write(tmp_path, {
        ".gitignore": f"*.so\n{bench}/out/\n",
        f"{docs}/design.md": "",
        f"{bench}/results/usage_sm90.json": "{}",
        f"{csrc}/cuda/a.cu": "",
        "pkg/a.py": (
            f"# see {docs}/design.md and {docs}/missing.md.\n"
            f"# writes {bench}/out/x.json, reads {bench}/results/usage_sm<arch>.json, {csrc}/cuda/*.cu\n"
            f"# https://example.org/{tests}/remote.py, {bench}/results/{{name}}.json, {csrc}/_C*.so\n"
            f"# {csrc}/cuda/*.cuh {tests}/nothing_here.py {bench}/results/other_sm<arch>.json\n"
        ),
        "pkg/b.md": f"The recipe adds {csrc}/cuda/new_op.cu.\n",
    })
    assert missing_cited_paths(root, scanned=("pkg",), examples={f"{csrc}/cuda/new_op.cu"}) == [
        f"pkg/a.py:1: {docs}/missing.md",
        f"pkg/a.py:4: {csrc}/cuda/*.cuh",
        f"pkg/a.py:4: {tests}/nothing_here.py",
        f"pkg/a.py:4: {bench}/results/other_sm<",
    ]
    assert missing_cited_paths(root, scanned=("pkg",), examples=set())[-1] == f"pkg/b.md:1: {csrc}/cuda/new_op.cu"


def test_mention_check(tmp_path):
    issue, design = "issue" + " 12", "DESIGN" + ".md"
    root = _write(tmp_path, {
        "a.py": f"# fixed in {issue}\nx = 1  # see " + "#" + "13 and pytorch/pytorch" + "#" + "99 &" + "#" + "160;\n",
        "notes/b.md": f"As {design} says.\nThe contracts are in design.md.\n",
        "build/c.txt": f"{issue}\n",
        ".gitignore": "build/\n",
    })
    assert forbidden_mentions(root) == [
        "a.py:1: issue number: " + issue,
        "a.py:2: issue number: " + "#" + "13",
        "notes/b.md:1: note outside the repository: " + design,
    ]


def test_test_import_check(tmp_path):
    root = _write(tmp_path, {
        "suite/__init__.py": "",
        "suite/conftest.py": "",
        "suite/helpers/__init__.py": "",
        "suite/helpers/models.py": "",
        "suite/ops/__init__.py": "",
        "suite/ops/test_a.py": "from suite.helpers.models import x\nfrom conftest import y\n",
        "suite/ops/test_b.py": "from .test_a import z\nfrom suite.ops import test_a\nimport suite.conftest\nfrom .. import helpers\n",
    })
    assert imports_of_test_files(root, "suite") == [
        "suite/ops/test_a.py:2: conftest",
        "suite/ops/test_b.py:1: .test_a",
        "suite/ops/test_b.py:2: suite.ops.test_a",
        "suite/ops/test_b.py:3: suite.conftest",
    ]
