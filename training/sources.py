"""Where a run's data comes from: the embedded synthetic set, a prepared folder or a raw file."""

from __future__ import annotations

from pathlib import Path

from training.config import DataSpec
from training.prepare import load_data
from training.sequence_data import SequenceData
from training.synthetic import SyntheticConfig, generate

SYNTHETIC = "synthetic"


def load_source(spec: DataSpec) -> SequenceData:
    """The data of `spec`, under its evaluation protocol."""
    if spec.path == SYNTHETIC:
        data = generate(SyntheticConfig(seed=spec.synthetic.seed, **spec.synthetic.overrides))
    else:
        data = load_data(Path(spec.path))
    return data.with_split(spec.split)
