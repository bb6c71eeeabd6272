"""`DataError`, the one exception of the data tools, and how its messages are phrased.

Readers, the vocabulary, the prepared folder and the item features all raise
it, so callers (the CLI, the job) catch one type. A message names the file,
the line and what was expected, so a user can fix the input without reading
the code.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A data file that cannot be read as asked: names the file, the line and the expectation."""


def line_error(path: Path | str, line: int, expected: str, got: str | None = None) -> DataError:
    found = "" if got is None else f", got {shorten(got)!r}"
    return DataError(f"{path}: line {line}: expected {expected}{found}")


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
