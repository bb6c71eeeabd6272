"""The JSON files of the data tools: how they are written and how a bad one is reported.

UTF-8 with non-ASCII characters kept, indent 1 and a final newline, so the
files of a prepared folder (and their sha256) are the same on every machine;
a missing or unparsable file is a `DataError` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.data_error import DataError


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: expected JSON: {error}") from None
