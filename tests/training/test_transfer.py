"""ANT-style transfer to another catalogue: finetune, relearn, text-only scoring of new items."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merging.main import main
from tests.modality_support import hashing_features, synthetic_texts, write_features
from tests.support import tiny_experiment
from training.item_features import build_item_features
from training.model import ModelConfig, build_model
from training.run import train
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData
from training.synthetic import SyntheticConfig, generate
from training.text_encoders import HashingEncoder
from training.transfer import Transfer, frozen_parameters, transfer_model

TARGET = SyntheticConfig(
    seed=7, num_users=250, num_items=90, num_topics=6, mean_length=12, max_length=25
)


@pytest.fixture(scope="module")
def target() -> SequenceData:
    return generate(TARGET)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory, small_data: SequenceData) -> Path:
    """A text-only tiny model trained on the small synthetic catalogue."""
    root = tmp_path_factory.mktemp("transfer")
    features = write_features(small_data, root / "features.safetensors")
    config = tiny_experiment(
        model__item_representation="text", data__features=str(features), train__epochs=1
    )
    train(config, small_data, root / "source")
    return root / "source"


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory, target: SequenceData) -> Path:
    folder = tmp_path_factory.mktemp("target") / "data"
    target.save(folder)
    write_features(target, folder / "features.safetensors")
    return folder


def test_a_text_model_scores_a_catalogue_it_never_saw(
    source_run: Path, target: SequenceData, small_data: SequenceData
) -> None:
    source = load_run_checkpoint(source_run).model
    model = transfer_model(source, hashing_features(target), "finetune").eval()
    histories = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    scores = model.logits(histories)
    assert scores.shape == (2, target.num_items) and torch.isfinite(scores).all()
    # An item of the new catalogue with the text of a known item is represented like it.
    shared = [item for item in target.vocab.items if item in small_data.vocab][:5]
    new_rows = torch.tensor([target.vocab.index(item) for item in shared])
    old_rows = torch.tensor([small_data.vocab.index(item) for item in shared])
    with torch.no_grad():
        assert torch.allclose(
            model.item_representations()[new_rows],
            source.item_representations()[old_rows],
            atol=1e-6,
        )


def test_finetune_starts_from_every_source_weight(source_run: Path, target: SequenceData) -> None:
    source = load_run_checkpoint(source_run).model
    model = transfer_model(source, hashing_features(target), "finetune")
    catalogue = {"output_bias", "item_features", "feature_mask"}
    for name, tensor in source.state_dict().items():
        if name not in catalogue:
            assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(model.output_bias, torch.zeros(target.num_items))
    assert frozen_parameters(model) == []


def test_relearn_keeps_the_blocks_and_relearns_the_rest(
    source_run: Path, target: SequenceData, target_dir: Path, tmp_path: Path
) -> None:
    source = load_run_checkpoint(source_run).model.state_dict()
    config = tiny_experiment(data__path=str(target_dir), train__epochs=1)
    result = train(config, target, tmp_path / "run", transfer=Transfer(source_run, "relearn"))
    assert result.best_epoch == 1
    trained = load_run_checkpoint(tmp_path / "run")
    state = trained.model.state_dict()
    blocks = [name for name in state if name.startswith("blocks.")]
    assert blocks and all(torch.equal(state[name], source[name]) for name in blocks)
    for relearnt in ("position_embedding.weight", "item_adaptor.weight", "final_norm.weight"):
        assert not torch.equal(state[relearnt], source[relearnt]), relearnt
    assert trained.info["transfer"] == {"source": str(source_run), "adaptation": "relearn"}
    assert trained.config.num_items == target.num_items


def test_relearn_freezes_only_the_blocks(source_run: Path, target: SequenceData) -> None:
    source = load_run_checkpoint(source_run).model
    model = transfer_model(source, hashing_features(target), "relearn", seed=3)
    frozen = frozen_parameters(model)
    assert frozen and all(name.startswith("blocks.") for name in frozen)
    assert len(frozen) == sum(1 for name, _ in source.named_parameters() if "blocks." in name)
    assert not torch.equal(model.position_embedding.weight, source.position_embedding.weight)
    assert torch.equal(model.item_adaptor.gate, torch.zeros_like(model.item_adaptor.gate))


def test_transfer_refusals(source_run: Path, target: SequenceData, tmp_path: Path) -> None:
    features = hashing_features(target)
    id_only = build_model(ModelConfig(num_items=20, hidden_size=16, num_heads=2))
    with pytest.raises(ValueError, match="items have text"):
        transfer_model(id_only, features, "relearn")
    texts = synthetic_texts(target.vocab)
    other = build_item_features(target.vocab, texts, HashingEncoder(8), None, None, False)
    with pytest.raises(ValueError, match="same encoder"):
        transfer_model(load_run_checkpoint(source_run).model, other, "relearn")
    with pytest.raises(ValueError, match="adaptation must be"):
        Transfer(source_run, "freeze")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        train(
            tiny_experiment(),
            target,
            tmp_path / "x",
            init=source_run,
            transfer=Transfer(source_run),
        )


def test_cli_transfer(source_run: Path, target_dir: Path, tmp_path: Path, capsys) -> None:
    argv = [
        "train",
        "--data",
        str(target_dir),
        "--out",
        str(tmp_path / "run"),
        "--transfer-from",
        str(source_run),
        "--adaptation",
        "finetune",
        "--epochs",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 0
    info = load_run_checkpoint(tmp_path / "run").info
    assert info["transfer"]["adaptation"] == "finetune"
    assert "best epoch 1" in capsys.readouterr().out
