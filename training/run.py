"""The one entry point of training: `train` runs a config in this process or on Ray Train.

The CLI, the merge job and the benchmarks call it; with `train.workers` > 1 the
run is data-parallel (training/distributed.py), otherwise a `Trainer` in this
process (training/trainer.py). Both write the same run folder.
"""

from __future__ import annotations

from pathlib import Path

from training.config import ExperimentConfig
from training.distributed import train_distributed
from training.sequence_data import SequenceData
from training.trainer import EpochCallback, Trainer, TrainResult
from training.transfer import Transfer


def train(
    config: ExperimentConfig,
    data: SequenceData,
    run_dir: Path,
    init: Path | None = None,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    transfer: Transfer | None = None,
) -> TrainResult:
    """Train `config` on `data` into `run_dir`; the one entry point of the CLI and the job.

    `init` continues a checkpoint of the same data; `transfer` starts from a model
    of another catalogue (training/transfer.py).
    """
    if config.train.workers > 1:
        if on_epoch is not None:
            raise ValueError("on_epoch callbacks cannot run in Ray Train's workers: use workers: 1")
        return train_distributed(config, data, run_dir, init=init, resume=resume, transfer=transfer)
    trainer = Trainer(config, data, run_dir, init=init, on_epoch=on_epoch, transfer=transfer)
    result = trainer.fit(resume=resume)
    assert result is not None  # one process writes
    return result
