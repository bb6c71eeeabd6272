"""training.warm_start: a published model carried over to a changed catalogue."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from merging.bundle import verify_bundle
from merging.export import export_bundle
from merging.main import main
from tests.support import SMALL_DATA, tiny_experiment
from training.checkpoint import load_checkpoint
from training.model import ModelConfig, build_model
from training.run import train
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData
from training.synthetic import generate
from training.vocabulary import Vocabulary
from training.warm_start import (
    BUNDLE_CHECKPOINT,
    load_bundle_source,
    warm_start_model,
    write_warm_start,
)

CONFIG = ModelConfig(num_items=4, hidden_size=8, num_layers=1, num_heads=1, max_len=6)


def test_rows_follow_the_external_ids() -> None:
    source = build_model(CONFIG, seed=0)
    with torch.no_grad():
        source.output_bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    old, new = Vocabulary(("a", "b", "c", "d")), Vocabulary(("c", "e", "a"))
    model, change = warm_start_model(source, old, new, seed=1)
    assert (change.kept, change.new, change.dropped) == (2, 1, 2)
    assert model.config.num_items == 3
    before, after = source.item_embedding.weight, model.item_embedding.weight
    assert torch.equal(after[1], before[3]) and torch.equal(after[3], before[1])  # c, a
    assert torch.equal(after[-1], before[-1])  # [MASK]
    assert torch.equal(after[0], torch.zeros(8))  # padding
    assert not any(torch.allclose(after[2], row) for row in before)  # e: a fresh row
    assert model.output_bias.tolist() == pytest.approx([0.3, 0.0, 0.1])  # e: fresh bias 0
    old_state, new_state = source.state_dict(), model.state_dict()
    shared = [n for n in old_state if n not in ("item_embedding.weight", "output_bias")]
    assert shared and all(torch.equal(old_state[n], new_state[n]) for n in shared)


def test_the_source_must_match_its_vocabulary() -> None:
    with pytest.raises(ValueError, match="do not belong together"):
        warm_start_model(build_model(CONFIG), Vocabulary(("a", "b")), Vocabulary(("a",)))


def grown(data: SequenceData, new_items: int, dropped: int) -> SequenceData:
    """The next day's catalogue: `new_items` unseen ids appear, the first `dropped` vanish."""
    gone = set(range(1, dropped + 1))
    fresh = [f"new{k}" for k in range(new_items)]
    externals = list(data.vocab.items) + fresh
    sequences = []
    rng = np.random.default_rng(0)
    for seq in data.sequences:
        kept = [int(i) for i in seq if int(i) not in gone]
        extra = rng.integers(data.num_items + 1, data.num_items + new_items + 1, size=2)
        sequences.append(np.array(kept + extra.tolist(), dtype=np.int64))
    used = sorted({int(i) for seq in sequences for i in seq})
    renumber = {old: new for new, old in enumerate(used, start=1)}
    vocab = Vocabulary(tuple(externals[old - 1] for old in used))
    sequences = [np.array([renumber[int(i)] for i in seq], dtype=np.int64) for seq in sequences]
    return SequenceData(sequences, data.users, vocab)


def test_a_bundle_carries_its_checkpoint_and_a_new_day_trains_from_it(
    trained_run: Path, small_data: SequenceData, tmp_path: Path
) -> None:
    bundle = tmp_path / "runs" / "day1"
    manifest = export_bundle(
        trained_run, bundle, small_data, parity_sequences=16, checkpoint_copy=True
    )
    assert any(name.startswith(f"{BUNDLE_CHECKPOINT}/") for name in manifest["files"])
    verify_bundle(bundle)
    source, vocab = load_bundle_source(bundle)
    assert vocab.items == small_data.vocab.items
    original = load_run_checkpoint(trained_run).model.state_dict()
    assert all(torch.equal(original[n], t) for n, t in source.model.state_dict().items())

    today = grown(small_data, new_items=5, dropped=3)
    out = tmp_path / "warm"
    change = write_warm_start(source, vocab, today, out, seed=0)
    assert (change.kept, change.new, change.dropped) == (small_data.num_items - 3, 5, 3)
    warm = load_checkpoint(out)
    assert warm.info["data_fingerprint"] == today.fingerprint
    assert warm.info["warm_start"]["kept"] == change.kept
    kept = small_data.vocab.items[10]
    assert torch.equal(
        warm.model.item_embedding.weight[today.vocab.index(kept)],
        source.model.item_embedding.weight[small_data.vocab.index(kept)],
    )
    assert small_data.vocab.items[0] not in today.vocab  # vanished: no row, no id

    # The trainer continues it like any --init, and the new items' rows learn.
    run = train(tiny_experiment(train__epochs=1), today, tmp_path / "run", init=out)
    trained = load_run_checkpoint(run.run_dir).model.item_embedding.weight
    new_id = today.vocab.index("new0")
    assert not torch.equal(trained[new_id], warm.model.item_embedding.weight[new_id])


def test_cli_warm_start_and_a_bundle_without_checkpoint(
    trained_run: Path, small_data: SequenceData, small_data_dir: Path, tmp_path: Path, capsys
) -> None:
    bundle = tmp_path / "bundle"
    command = ["warm-start", "--from", str(bundle), "--data", str(small_data_dir)]
    command += ["--out", str(tmp_path / "w")]
    export_bundle(trained_run, bundle, small_data, parity_sequences=16)
    with pytest.raises(ValueError, match="carries no checkpoint/"):
        load_bundle_source(bundle)
    assert main(command) == 2
    assert "carries no checkpoint/" in capsys.readouterr().err
    export_bundle(trained_run, bundle, small_data, parity_sequences=16, checkpoint_copy=True)
    assert main(command) == 0
    assert f"{small_data.num_items} items kept, 0 new, 0 dropped" in capsys.readouterr().out


def test_a_text_model_is_refused() -> None:
    config = dataclasses.replace(CONFIG, item_representation="id+text", feature_dim=4)
    with pytest.raises(ValueError, match="--transfer-from"):
        warm_start_model(build_model(config), Vocabulary(tuple("abcd")), Vocabulary(tuple("ab")))


def test_synthetic_catalogues_of_two_days_share_external_ids() -> None:
    # The pipeline test grows the catalogue this way: same generator, more items.
    day1 = generate(SMALL_DATA)
    day2 = generate(SMALL_DATA.model_copy(update={"num_items": SMALL_DATA.num_items + 20}))
    assert set(day1.vocab.items) & set(day2.vocab.items)
    assert set(day2.vocab.items) - set(day1.vocab.items)
