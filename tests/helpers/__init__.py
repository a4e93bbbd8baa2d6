"""Testing helpers, importable as `tests.helpers`: backends (where the tests run), tolerances (the
tolerance rule of the op tests), tiny_models (tiny random diffusers / transformers models built
from configs) and official (ports of the official LinFusion / LongAlign code the tests compare
against). Tests import helpers from here, never from other test files."""
