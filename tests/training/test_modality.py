"""Modality-aware item representation: plain models unchanged, the adaptor, checkpoints,
Fisher, merging and ONNX export with text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merging.fisher import FisherConfig, compute_fisher
from merging.merge import MergeConfig, merge_checkpoints
from tests.modality_support import FEATURE_DIM, random_features, write_features
from tests.support import tiny_experiment
from training.batching import pad_left
from training.checkpoint import load_checkpoint, write_checkpoint
from training.losses import cloze_loss, next_item_loss
from training.modality import WhiteningMixture
from training.model import ModelConfig, SequenceRecommender, build_model
from training.run import train
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData

REFERENCE = Path(__file__).parent / "data" / "plain-reference"
BACKBONES = ["sasrec", "bert4rec"]


def reference_config(backbone: str) -> ModelConfig:
    """The model tests/data/plain-reference was written with, by the code before modality."""
    # The defaults of that code, written out: the library defaults have changed since.
    return ModelConfig(
        num_items=40,
        backbone=backbone,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        ffn_mult=4,
        max_len=8,
        dropout=0.2,
        attn_dropout=0.2,
        embedding_input="layernorm",
        prediction_head=True,
        activation="gelu",
        block="prenorm",
        attention_init="normal",
        positions="end",
    )


def text_model(representation: str, num_items: int = 30, seed: int = 0) -> SequenceRecommender:
    config = ModelConfig(
        num_items=num_items,
        hidden_size=16,
        num_heads=2,
        max_len=8,
        item_representation=representation,  # type: ignore[arg-type]
        feature_dim=FEATURE_DIM,
        adaptor_experts=3,
    )
    model = build_model(config, seed=seed)
    mask = torch.ones(num_items)
    mask[-4:] = 0.0  # the last four items have no text
    features = torch.from_numpy(random_features(num_items, seed=seed)) * mask[:, None]
    model.set_item_features(features, mask)
    return model.eval()


# ---- with modality off, nothing changes ------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_plain_models_match_the_pre_modality_code(backbone: str, tmp_path: Path) -> None:
    """Same names, same initial draws, same training steps as a checkpoint of the old code.

    tests/data/plain-reference was written by the code of commit d6568d2 (before
    modality) running exactly the steps below: build with seed 0, write_checkpoint,
    then three AdamW steps of the plain loss, single-threaded.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference was written single-threaded
    try:
        config = reference_config(backbone)
        model = build_model(config, seed=0)
        reference = load_file(str(REFERENCE / backbone / "model.safetensors"))
        state = model.state_dict()
        assert set(state) == set(reference)  # the same parameter names
        assert all(torch.equal(state[name], reference[name]) for name in reference)
        write_checkpoint(tmp_path / "ckpt", model, config, {"note": "reference"})
        old = json.loads((REFERENCE / backbone / "checkpoint.json").read_text())
        new = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
        assert new["info"] == old["info"]
        # Later fields are added; the old ones are unchanged and the old file reads back.
        assert old["model_config"].items() <= new["model_config"].items()
        assert ModelConfig.from_dict(old["model_config"]) == config
        # The same three optimiser steps as the reference script.
        items = torch.tensor(
            [
                [0, 0, 3, 5, 7, 9, 11, 2, 4],
                [1, 2, 3, 4, 5, 6, 7, 8, 9],
                [0, 0, 0, 0, 0, 12, 30, 40, 1],
            ]
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        model.train()
        for _ in range(3):
            loss = (
                next_item_loss(model, items)
                if config.causal
                else cloze_loss(model, items[:, 1:], 0.3)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trained = load_file(str(REFERENCE / backbone / "trained.safetensors"))
        # The initial weights above are bit-equal on every machine. Training is not:
        # CPUs with other vector units round matmuls differently, and Adam turns a
        # rounding difference on a near-zero gradient into a visible step (seen between
        # two x86 machines: 1.3e-6). So the trained weights are compared to 1e-4, two
        # orders below one AdamW step (lr 1e-2), which any change of the computation
        # (an extra dropout draw, another mask) moves most weights by.
        for name, expected in trained.items():
            torch.testing.assert_close(model.state_dict()[name], expected, rtol=0, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_plain_config_is_written_without_modality_fields() -> None:
    plain = reference_config("sasrec").to_dict()
    assert "item_representation" not in plain and "feature_dim" not in plain
    assert ModelConfig.from_dict(plain) == reference_config("sasrec")
    text = text_model("text").config
    assert ModelConfig.from_dict(text.to_dict()) == text


def test_config_refuses_inconsistent_modality() -> None:
    with pytest.raises(ValueError, match="needs feature_dim"):
        ModelConfig(num_items=5, item_representation="text")
    with pytest.raises(ValueError, match="feature_dim is for"):
        ModelConfig(num_items=5, feature_dim=8)
    with pytest.raises(ValueError, match="item_representation must be"):
        ModelConfig(num_items=5, item_representation="image", feature_dim=3)  # type: ignore[arg-type]


# ---- the adaptor and the item table ------------------------------------------------------------


def test_whitening_mixture_is_the_formula() -> None:
    torch.manual_seed(0)
    adaptor = WhiteningMixture(6, 4, experts=3, dropout=0.0).eval()
    with torch.no_grad():
        adaptor.bias.normal_()
        adaptor.gate.normal_()
    x = torch.randn(5, 6)
    gate = torch.softmax(x @ adaptor.gate, dim=-1)
    expected = sum(
        gate[:, k : k + 1] * ((x - adaptor.bias[k]) @ adaptor.weight[k]) for k in range(3)
    )
    assert torch.allclose(adaptor(x), expected, atol=1e-6)


def test_id_plus_text_table() -> None:
    model = text_model("id+text")
    table = model.item_representations()
    n = model.config.num_items
    text = model.item_adaptor(model.item_features)
    ids = model.item_embedding.weight
    assert torch.allclose(table[1 : n - 3], ids[1 : n - 3] + text[: n - 4])
    assert torch.equal(table[n - 3 : n + 1], ids[n - 3 : n + 1])  # no text: the ID row alone
    assert torch.equal(table[0], torch.zeros(16))  # padding


def test_text_only_table_and_one_table_for_input_and_output() -> None:
    model = text_model("text")
    assert not hasattr(model, "item_embedding")
    table = model.item_representations()
    n = model.config.num_items
    assert torch.equal(table[n - 3 : n + 1], torch.zeros(4, 16))  # items without text
    assert torch.equal(table[n + 1], model.mask_embedding[0])
    ids = torch.tensor([[0, 3, 7, n + 1]])
    assert torch.equal(model.embed(ids), table[ids])
    assert torch.equal(model.output_weight(), table[1 : n + 1])


@pytest.mark.parametrize("representation", ["id+text", "text"])
def test_gradients_reach_the_adaptor_through_both_sides(representation: str) -> None:
    model = text_model(representation).train()
    items = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    next_item_loss(model, items).backward()
    assert float(model.item_adaptor.weight.grad.abs().sum()) > 0
    assert model.item_features.grad is None  # features stay frozen


@pytest.mark.parametrize("representation", ["id+text", "text"])
def test_checkpoint_round_trip_with_features(representation: str, tmp_path: Path) -> None:
    model = text_model(representation)
    write_checkpoint(tmp_path / "ckpt", model, model.config)
    loaded = load_checkpoint(tmp_path / "ckpt")
    history = torch.tensor([[0, 3, 4, 5], [1, 2, 3, 29]])
    assert torch.equal(model.logits(history), loaded.model.logits(history))
    assert torch.equal(loaded.model.item_features, model.item_features)
    assert loaded.config == model.config


def test_set_item_features_checks_shapes() -> None:
    model = text_model("text")
    with pytest.raises(ValueError, match="do not fit"):
        model.set_item_features(torch.zeros(3, FEATURE_DIM), torch.ones(3))
    with pytest.raises(ValueError, match="no text part"):
        build_model(reference_config("sasrec")).set_item_features(torch.zeros(1), torch.zeros(1))


# ---- Fisher and merging with text ------------------------------------------------------------------


def brute_force_fisher(model: SequenceRecommender, sequences: list[np.ndarray]) -> dict:
    """Σ_s Σ_j p_j (∇ log p_j)², one autograd.grad per item: the definition."""
    params = dict(model.named_parameters())
    sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    for seq in sequences:
        log_p = torch.log_softmax(model.logits(torch.as_tensor(seq[:-1])[None])[0], -1)
        for j in range(len(log_p)):
            grads = torch.autograd.grad(log_p[j], list(params.values()), retain_graph=True)
            for name, g in zip(params, grads, strict=True):
                sums[name] += float(log_p[j].detach().exp()) * g.double().square()
    return sums


def test_fisher_of_a_text_model(small_data: SequenceData) -> None:
    model = text_model("id+text", num_items=12)
    sequences = [np.array([1, 2, 3, 4]), np.array([5, 11, 12, 6, 2])]
    with pytest.raises(ValueError, match="assumes ID-only items"):
        compute_fisher(model, sequences, FisherConfig(estimator="exact"))
    with pytest.raises(ValueError, match="assumes ID-only items"):
        compute_fisher(model, sequences, FisherConfig(estimator="target", engine="structured"))
    full = compute_fisher(model, sequences, FisherConfig(estimator="full"))
    reference = brute_force_fisher(model, sequences)
    assert set(full.sums) == set(reference)
    for name, value in reference.items():
        assert torch.allclose(full.sums[name], value, rtol=1e-4, atol=1e-9), name
    assert float(full.sums["item_adaptor.weight"].sum()) > 0
    # Item-list estimators run on the autograd engine (the default engine refuses text).
    sampled = compute_fisher(model, sequences, FisherConfig(estimator="sample:5"))
    assert all(torch.isfinite(v).all() for v in sampled.sums.values())


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory: pytest.TempPathFactory, small_data: SequenceData) -> dict:
    """Two tiny id+text runs (different seeds) and their feature file."""
    root = tmp_path_factory.mktemp("text-runs")
    features = write_features(small_data, root / "features.safetensors", without_text=10)
    runs = {}
    for seed in (0, 1):
        config = tiny_experiment(
            model__item_representation="id+text",
            data__features=str(features),
            train__epochs=1,
            train__seed=seed,
        )
        runs[seed] = root / f"run{seed}"
        train(config, small_data, runs[seed])
    return runs


def test_text_checkpoints_merge_and_keep_their_features(
    text_runs: dict, small_data: SequenceData, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    merge_checkpoints([text_runs[0], text_runs[1]], out, MergeConfig(method="uniform"))
    merged = load_run_checkpoint(out).model
    first, second = (load_run_checkpoint(text_runs[s]).model for s in (0, 1))
    assert torch.equal(merged.item_features, first.item_features)
    expected = (first.item_adaptor.weight + second.item_adaptor.weight) / 2
    assert torch.allclose(merged.item_adaptor.weight, expected, atol=1e-7)


# ---- ONNX with text ---------------------------------------------------------------------------------

NO_TORCH_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime
    from serving.bundle import load_bundle
    bundle = load_bundle(sys.argv[1])
    session = onnxruntime.InferenceSession(
        sys.argv[1] + "/model.onnx", providers=["CPUExecutionProvider"]
    )
    from serving.runtime import graph_feed
    items = np.array(json.loads(sys.argv[2]), dtype=np.int64)
    feed = graph_feed(session, items, 5, np.array([True, False]))
    scores, indices = session.run(["scores", "indices"], feed)
    assert "torch" not in sys.modules
    print(json.dumps({"num_items": bundle.num_items, "scores": scores.tolist(),
                      "indices": indices.tolist()}))
    """
)


def test_onnx_export_of_a_text_model_matches_torch_without_torch(
    text_runs: dict, small_data: SequenceData, tmp_path: Path
) -> None:
    from merging.export import export_bundle
    from merging.onnx_graph import torch_topk

    out = tmp_path / "bundle"
    manifest = export_bundle(text_runs[0], out, small_data, parity_sequences=32)
    assert manifest["onnx"]["parity"]["passed"]  # the export checked parity itself
    assert manifest["model"]["item_representation"] == "id+text"
    ids = [[0, 0, 3, 4, 5], [9, 8, 7, 6, 5]]
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_CHILD, str(out), json.dumps(ids)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    served = json.loads(result.stdout)
    assert served["num_items"] == small_data.num_items
    model = load_run_checkpoint(text_runs[0]).model.eval()
    scores, indices = torch_topk(
        model, pad_left([np.array(r)[np.array(r) > 0] for r in ids]), 5, torch.tensor([True, False])
    )
    assert np.allclose(np.array(served["scores"]), scores.numpy(), atol=1e-4)
    assert np.array_equal(np.array(served["indices"]), indices.numpy())
