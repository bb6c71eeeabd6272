"""Where a run's data comes from: the embedded synthetic set, a prepared folder or a raw file."""

from __future__ import annotations

from pathlib import Path

from training.config import DataSpec
from training.data import SequenceData, load_data
from training.synthetic import SyntheticConfig, generate

SYNTHETIC = "synthetic"


def load_source(spec: DataSpec) -> SequenceData:
    if spec.path == SYNTHETIC:
        return generate(SyntheticConfig(seed=spec.synthetic.seed, **spec.synthetic.overrides))
    return load_data(Path(spec.path))
