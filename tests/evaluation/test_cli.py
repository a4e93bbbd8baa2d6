"""The evaluation CLI's help runs in a fresh interpreter without importing the optional
dependencies (diffusers, transformers, scipy, datasets, ...): they load only when a command runs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPTIONAL = ["diffusers", "transformers", "scipy", "datasets", "accelerate", "open_clip", "safetensors", "PIL", "peft"]

PROBE = f"""
import json, sys
from linfusion_ops.evaluation.cli import main
codes = []
for argv in (["--help"], ["generate", "--help"], ["metrics", "--help"]):
    try:
        main(argv)
    except SystemExit as stop:
        codes.append(stop.code)
print(json.dumps({{"codes": codes, "loaded": [m for m in {OPTIONAL!r} if m in sys.modules]}}))
"""


def run(args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_help_of_every_command_imports_no_optional_dependency():
    done = run(["-c", PROBE])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0], "loaded": []}


def test_python_dash_m_help():
    done = run(["-m", "linfusion_ops.evaluation", "--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m linfusion_ops.evaluation") and "{generate,metrics}" in done.stdout


def test_main_is_the_console_entry_point():
    from linfusion_ops.evaluation import cli, main

    assert main is cli.main
    with pytest.raises(SystemExit) as stop:
        cli.main(["metrics"])  # argparse: --samples is required
    assert stop.value.code == 2
