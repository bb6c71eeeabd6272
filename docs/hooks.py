"""MkDocs hook: publish the benchmark plots with the site.

The plots live beside their JSON under `benchmarks/results/`, outside the docs
folder. This hook adds every `benchmarks/results/*.png` to the site as
`benchmarks/results/NAME.png`, so a page under `docs/results/` shows one with
`![...](../benchmarks/results/NAME.png)` and the strict build checks the link.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent


def on_files(files: Files, config: Any) -> Files:
    for plot in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(
            File(
                plot.relative_to(ROOT).as_posix(),
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
