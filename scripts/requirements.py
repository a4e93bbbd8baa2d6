"""Writes requirements-dev.txt from pyproject.toml's `dev` extra (the one source of truth), with
the extras it names (linfusion_ops[longalign,eval], ...) expanded; torch, installed first by
scripts/env.sh, is left out.

    python scripts/requirements.py          # rewrite requirements-dev.txt
    python scripts/requirements.py --check  # exit 1 if requirements-dev.txt is out of date
"""

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = ("# Generated from pyproject.toml's [dev] extra by scripts/requirements.py: edit pyproject.toml, then\n"
          "# run `python scripts/requirements.py`. torch is installed first (scripts/env.sh).\n")


def expand(name, optional):
    """The requirements of extra `name` (optional: pyproject's optional-dependencies), with the
    package's own extras (`linfusion_ops[a,b]`) replaced by their requirements, in order,
    without repeats."""
    out = []
    for requirement in optional[name]:
        match = re.fullmatch(r"linfusion_ops\[([\w,\s-]+)\]", requirement.strip())
        items = [r for e in match.group(1).split(",") for r in expand(e.strip(), optional)] if match else [requirement]
        out += [r for i, r in enumerate(items) if r not in out and r not in items[:i]]
    return out


def render(pyproject=ROOT / "pyproject.toml") -> str:
    """The text of requirements-dev.txt for this pyproject.toml."""
    optional = tomllib.loads(Path(pyproject).read_text())["project"]["optional-dependencies"]
    return HEADER + "".join(r + "\n" for r in expand("dev", optional))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that requirements-dev.txt is up to date")
    args = parser.parse_args(argv)
    target = ROOT / "requirements-dev.txt"
    text = render()
    if args.check:
        if target.read_text() != text:
            sys.exit("requirements-dev.txt is out of date: run `python scripts/requirements.py`")
        return
    target.write_text(text)


if __name__ == "__main__":
    main()
