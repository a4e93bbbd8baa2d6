"""The evaluation tests build their tiny models with the shared builders (tiny pipelines,
tokenizer, CLIP) of python_tests/tiny_models.py until they move to tests.helpers."""

import sys
from pathlib import Path

_TINY_MODELS = Path(__file__).resolve().parents[2] / "python_tests"
if str(_TINY_MODELS) not in sys.path:
    sys.path.insert(0, str(_TINY_MODELS))
