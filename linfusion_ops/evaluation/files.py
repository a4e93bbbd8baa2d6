"""Atomic file writes for the evaluation outputs: a file is written to a hidden temporary name
in its folder and renamed over the target, so a killed process leaves either the complete file
or a hidden ``.*.tmp-*`` file that no reader treats as a result."""

import os
from typing import Union

__all__ = ["write_atomic", "temporary_path", "remove_stale_temporaries"]

TMP_MARK = ".tmp-"


def temporary_path(path: Union[str, os.PathLike]) -> str:
    """The hidden temporary name for ``path`` in the same folder (unique per process)."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}{TMP_MARK}{os.getpid()}")


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, str]) -> None:
    """Write ``data`` (bytes, or str as UTF-8) to ``path``: temporary file, fsync, rename."""
    path = os.fspath(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temporaries(folder: Union[str, os.PathLike]) -> int:
    """Delete the temporary files a killed run left in ``folder``; returns how many."""
    removed = 0
    for name in os.listdir(folder):
        if name.startswith(".") and TMP_MARK in name:
            os.remove(os.path.join(folder, name))
            removed += 1
    return removed
