"""Print fishrec's requirements for some extras, one per line, from pyproject.toml.

The images install their dependencies in a layer of their own, before the
source is copied, so that a code change rebuilds only the last layers. This
reads the one list of dependencies there is (pyproject.toml) instead of
keeping a second copy in a requirements file:

    python requirements.py pyproject.toml serve > requirements.txt

Standard library only: it runs in a bare python image before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

SELF_REFERENCE = re.compile(r"^fishrec\[(?P<extras>[^\]]+)\]$")


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The base dependencies plus those of `extras` (self-references such as fishrec[serve] expanded)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    lines = list(project.get("dependencies", []))
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            known = ", ".join(sorted(optional)) or "none"
            raise ValueError(f"{pyproject} has no extra {extra!r} (extras: {known})")
        seen.add(extra)
        for line in optional[extra]:
            nested = SELF_REFERENCE.match(line.replace(" ", ""))
            if nested:
                pending.extend(nested["extras"].split(","))
            else:
                lines.append(line)
    return list(dict.fromkeys(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path, help="path of pyproject.toml")
    parser.add_argument("extras", nargs="*", help="extras to include (e.g. serve, train)")
    args = parser.parse_args(argv)
    try:
        lines = requirements(args.pyproject, args.extras)
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as err:
        parser.exit(2, f"requirements.py: error: {err}\n")
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
