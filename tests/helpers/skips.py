"""The skip summary at the end of a test run: how many tests skipped for each reason (the
pytest_terminal_summary hook of tests/conftest.py prints it), instead of one line per test."""

from collections import Counter
from typing import Iterable, List, Tuple


def skip_reason(report) -> str:
    """The reason of a skipped test's report (pytest's longrepr is (path, line, "Skipped: why"))."""
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return message[len("Skipped: "):] if message.startswith("Skipped: ") else message


def skip_counts(reports: Iterable) -> List[Tuple[int, str]]:
    """(count, reason) for each distinct skip reason, most frequent first (ties by reason)."""
    counts = Counter(skip_reason(r) for r in reports)
    return sorted(((n, reason) for reason, n in counts.items()), key=lambda item: (-item[0], item[1]))


def summary_lines(reports: Iterable) -> List[str]:
    """The summary's lines: "<count> <reason>", right-aligned counts; none without skips."""
    counts = skip_counts(reports)
    width = len(str(counts[0][0])) if counts else 0
    return [f"{n:>{width}}  {reason}" for n, reason in counts]
