"""Fisher estimators: the exact identity against brute force, every estimator against hand sums."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from merging.fisher import FisherConfig, compute_fisher, select_sequences
from merging.fisher_accumulator import FisherAccumulator
from merging.fisher_estimators import ESTIMATORS, parse_estimator
from merging.fisher_exact import autograd_items, exact_identity
from merging.fisher_file import load_fisher, save_fisher
from merging.fisher_result import FisherResult, relative_error
from merging.main import main
from training.model import ModelConfig, SequenceRecommender, build_model

NUM_ITEMS = 23


def tiny_model(backbone: str) -> SequenceRecommender:
    """A 2-layer model whose weights are far from the initialisation, so p is not uniform."""
    config = ModelConfig(
        num_items=NUM_ITEMS, backbone=backbone, hidden_size=8, num_heads=2, max_len=6
    )
    model = build_model(config, seed=3).double()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.4 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
        model.item_embedding.weight[0] = 0.0  # the padding row stays zero, as in training
    return model.eval()


@pytest.fixture(scope="module", params=["sasrec", "bert4rec"])
def model(request: pytest.FixtureRequest) -> SequenceRecommender:
    return tiny_model(request.param)


def sequences() -> list[np.ndarray]:
    """Varied lengths (2 .. longer than max_len) and a repeated item."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, NUM_ITEMS + 1, size=n) for n in (2, 3, 5, 7, 9)]
    return [*seqs, np.array([4, 4, 9, 4, 2])]


def fisher(model: SequenceRecommender, estimator: str, **options) -> dict[str, torch.Tensor]:
    result = compute_fisher(model, sequences(), FisherConfig(estimator=estimator, **options))
    return result.mean(torch.float64)


def assert_fisher_close(actual: dict, expected: dict, rtol: float) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(
            actual[name], expected[name], rtol=rtol, atol=1e-12 * max(scale, 1e-30), msg=name
        )


# ---- the exact identity -------------------------------------------------------------


def test_exact_equals_brute_force_for_every_parameter(model: SequenceRecommender) -> None:
    exact, full = fisher(model, "exact"), fisher(model, "full")
    assert set(full) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert full[name].shape == param.shape
        assert float(full[name].abs().max()) > 0, name
    assert_fisher_close(exact, full, rtol=1e-5)
    # The padding row never gets gradient; BERT4Rec's [MASK] row does (it is an input).
    table = exact["item_embedding.weight"]
    assert float(table[0].abs().max()) == 0.0
    assert (float(table[NUM_ITEMS + 1].abs().max()) > 0) == (model.config.backbone == "bert4rec")


def test_exact_equals_brute_force_with_padding(model: SequenceRecommender) -> None:
    def per_history(history: torch.Tensor, engine: str) -> dict[str, torch.Tensor]:
        acc = FisherAccumulator(model)
        if engine == "exact":
            exact_identity(model, history, None, acc)
        else:
            autograd_items(model, history, lambda p: (torch.arange(len(p)), p), acc, 64)
        return acc.sums

    history = torch.tensor([[5, 1, 7]])
    padded = torch.tensor([[0, 0, 0, 5, 1, 7]])  # left padding, as in every batch
    reference = per_history(history, "full")
    assert_fisher_close(per_history(padded, "exact"), reference, rtol=1e-5)
    assert_fisher_close(per_history(padded, "full"), reference, rtol=1e-9)


def test_exact_in_float32_is_close_to_float64() -> None:
    exact32 = fisher(tiny_model("sasrec").float(), "exact")
    full64 = fisher(tiny_model("sasrec"), "full")
    assert relative_error(exact32, full64) < 1e-4


def test_truncation_reports_the_dropped_eigenvalue_mass() -> None:
    model = tiny_model("sasrec")
    full_rank = compute_fisher(model, sequences(), FisherConfig(estimator="exact:8"))
    assert full_rank.mean_dropped_mass == pytest.approx(0.0, abs=1e-12)
    assert relative_error(full_rank.mean(torch.float64), fisher(model, "exact")) < 1e-12
    masses = []
    for rank in (4, 1):
        result = compute_fisher(model, sequences(), FisherConfig(estimator=f"exact:{rank}"))
        masses.append(result.mean_dropped_mass)
        assert relative_error(result.mean(torch.float64), fisher(model, "exact")) > 1e-3
    assert 0.0 < masses[0] < masses[1] < 1.0


def test_truncated_covariance_is_exact_over_every_item_and_unbiased_below() -> None:
    model = tiny_model("sasrec")
    exact = fisher(model, "exact")
    whole = compute_fisher(model, sequences(), FisherConfig(estimator=f"truncated:{NUM_ITEMS}"))
    assert relative_error(whole.mean(torch.float64), exact) < 1e-12

    # Below N, each sequence's C is drawn: one estimate errs, the mean of estimates over
    # seeds errs less (unbiased: about 1/sqrt(8) as much), and more exact items leave
    # less to draw.
    def estimate(items: int, seed: int) -> dict[str, torch.Tensor]:
        config = FisherConfig(estimator=f"truncated:{items}", seed=seed)
        return compute_fisher(model, sequences(), config).mean(torch.float64)

    runs = [estimate(3, seed) for seed in range(8)]
    averaged = {k: sum(r[k] for r in runs) / len(runs) for k in exact}
    single = relative_error(runs[0], exact)
    assert relative_error(averaged, exact) < 0.6 * single, single
    assert relative_error(estimate(12, 0), exact) < single


def test_truncated_covariance_estimates_the_tail_without_bias() -> None:
    from merging.fisher_exact import _covariance

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    p = torch.softmax(3 * torch.randn(50, generator=generator, dtype=torch.float64), 0)
    mean = p @ weight
    exact = _covariance(weight, p, mean)
    torch.testing.assert_close(_covariance(weight, p, mean, 50), exact)
    draws = [_covariance(weight, p, mean, 10, generator) for _ in range(4000)]
    assert all(bool((torch.linalg.eigvalsh(c) > -1e-12).all()) for c in draws[:20])  # PSD
    average = torch.stack(draws).mean(0)
    spread = torch.stack(draws).std(0) / len(draws) ** 0.5  # standard error per entry
    assert bool(((average - exact).abs() < 5 * spread + 1e-12).all())
    assert float((draws[0] - exact).abs().max()) > 10 * float((average - exact).abs().max())


# ---- item-list estimators ---------------------------------------------------------------


@pytest.mark.parametrize("estimator", [f"topk:{NUM_ITEMS}", f"random:{NUM_ITEMS}", "full"])
def test_estimators_over_every_item_equal_full(model: SequenceRecommender, estimator: str) -> None:
    reference = fisher(model, "full", engine="autograd")
    assert_fisher_close(fisher(model, estimator, engine="structured"), reference, rtol=1e-9)


def test_structured_and_autograd_engines_agree_on_the_same_draws() -> None:
    model = tiny_model("bert4rec")
    structured = fisher(model, "sample:7", engine="structured", seed=5)
    brute = fisher(model, "sample:7", engine="autograd", seed=5)
    assert_fisher_close(structured, brute, rtol=1e-9)


def test_sampled_fisher_converges_to_full() -> None:
    model = tiny_model("sasrec")
    full = fisher(model, "full")
    errors = [relative_error(fisher(model, f"sample:{n}", seed=1), full) for n in (3, 30, 3000)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.05, errors


def test_random_estimator_is_unbiased() -> None:
    model = tiny_model("sasrec")
    full = fisher(model, "full")
    draws = [fisher(model, "random:5", seed=s) for s in range(40)]
    average = {k: torch.stack([d[k] for d in draws]).mean(0) for k in full}
    assert relative_error(average, full) < 0.5 * min(relative_error(d, full) for d in draws[:5])


def hand_fisher(model: SequenceRecommender, weighted_by_p: bool) -> dict[str, torch.Tensor]:
    """The true next item's squared gradient by plain autograd, one sequence at a time."""
    model.eval()
    sums = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for seq in sequences():
        model.zero_grad()
        log_p = torch.log_softmax(model.logits(torch.as_tensor(seq[:-1])[None]), -1)[0]
        log_p[seq[-1] - 1].backward()
        weight = float(log_p[seq[-1] - 1].detach().exp()) if weighted_by_p else 1.0
        for name, p in model.named_parameters():
            sums[name] += weight * p.grad.square()
    return {name: s / len(sequences()) for name, s in sums.items()}


@pytest.mark.parametrize("estimator", ["target", "empirical"])
def test_target_and_empirical_match_hand_computation(
    model: SequenceRecommender, estimator: str
) -> None:
    expected = hand_fisher(model, weighted_by_p=estimator == "target")
    assert_fisher_close(fisher(model, estimator), expected, rtol=1e-9)


def test_batch_shortcut_squares_the_batch_sum() -> None:
    model = tiny_model("sasrec")
    # One sequence per batch: the square of the batch sum is the per-sequence square.
    single = fisher(model, "sample:5", batch_shortcut=True, batch_size=1, seed=2)
    assert_fisher_close(single, fisher(model, "sample:5", seed=2), rtol=1e-9)
    # A padded batch of all sequences: (Σ_b g_b)² with g_b the empirical gradient of row b.
    model.zero_grad()
    for seq in sequences():
        log_p = torch.log_softmax(model.logits(torch.as_tensor(seq[:-1])[None]), -1)[0]
        log_p[seq[-1] - 1].backward()
    expected = {n: p.grad.square() / len(sequences()) for n, p in model.named_parameters()}
    batched = fisher(model, "empirical", batch_shortcut=True, batch_size=len(sequences()))
    assert_fisher_close(batched, expected, rtol=1e-9)
    assert relative_error(batched, fisher(model, "empirical")) > 0.1  # cross terms differ


def test_eval_mode_is_used_and_training_mode_restored() -> None:
    model = tiny_model("bert4rec").train()
    expected = fisher(tiny_model("bert4rec").eval(), "exact")
    assert_fisher_close(fisher(model, "exact"), expected, rtol=1e-12)
    assert model.training


# ---- sharding, parsing, files -----------------------------------------------------------


def test_shards_add_up_to_the_whole() -> None:
    model = tiny_model("sasrec")
    seqs = sequences()
    config = FisherConfig(estimator="sample:4", seed=9)
    whole = compute_fisher(model, seqs, config)
    ids = list(range(len(seqs)))
    parts = [compute_fisher(model, seqs[a:b], config, ids[a:b]) for a, b in ((0, 2), (2, 6))]
    total = sum(parts)
    assert isinstance(total, FisherResult) and total.count == whole.count
    assert_fisher_close(total.mean(torch.float64), whole.mean(torch.float64), rtol=1e-12)
    with pytest.raises(ValueError, match="cannot add"):
        _ = whole + compute_fisher(model, seqs, FisherConfig(estimator="target"))


def test_parse_estimator() -> None:
    assert str(parse_estimator("sample:50")) == "sample:50"
    assert parse_estimator("exact").n is None and parse_estimator("exact:16").n == 16
    assert set(ESTIMATORS) == {
        *("exact", "truncated", "full", "random", "topk", "sample", "target", "empirical")
    }
    for bad, message in [
        ("samples:5", "unknown"),
        ("sample", "needs a count"),
        ("truncated", "needs a count"),
        ("target:3", "takes no count"),
        ("topk:0", "positive integer"),
        ("topk:x", "positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_estimator(bad)
    with pytest.raises(ValueError, match="exact"):
        compute_fisher(tiny_model("sasrec"), sequences(), FisherConfig(batch_shortcut=True))


def test_select_sequences_is_a_seeded_subset() -> None:
    train = [np.array([1]), *sequences()]
    ids, seqs = select_sequences(train, None)
    assert ids == list(range(1, len(train)))  # the 1-item sequence has nothing to predict
    assert all(seq is train[i] for i, seq in zip(ids, seqs, strict=True))
    ids_a, _ = select_sequences(train, 3, seed=1)
    assert ids_a == select_sequences(train, 3, seed=1)[0] and len(ids_a) == 3
    assert ids_a == sorted(ids_a) and all(len(train[i]) >= 2 for i in ids_a)


def test_save_and_load_round_trip_and_detect_corruption(tmp_path: Path) -> None:
    values = fisher(tiny_model("sasrec"), "target")
    path = tmp_path / "f.safetensors"
    save_fisher(path, values, {"estimator": "target", "sequences": 6})
    loaded = load_fisher(path)
    assert loaded.metadata["estimator"] == "target" and loaded.metadata["sequences"] == 6
    for name, tensor in values.items():
        assert torch.equal(loaded.tensors[name], tensor.contiguous())
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF  # flip bits inside the last tensor's data
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum"):
        load_fisher(path)


def test_cli_writes_a_fisher_with_provenance(
    trained_run: Path, small_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fisher.safetensors"
    argv = ["fisher", "--checkpoint", str(trained_run), "--data", str(small_data_dir)]
    assert main([*argv, "--estimator", "exact", "--num-sequences", "12", "--out", str(out)]) == 0
    loaded = load_fisher(out)
    manifest = json.loads((trained_run / "best" / "checkpoint.json").read_text())
    meta = loaded.metadata
    assert meta["estimator"] == "exact" and meta["sequences"] == 12
    assert meta["checkpoint_sha256"] == manifest["files"]["model.safetensors"]
    assert meta["data_fingerprint"] == manifest["info"]["data_fingerprint"]
    assert meta["per_sequence"] == "exact"
    with safe_open(str(out), framework="pt") as handle:
        assert set(handle.keys()) == set(loaded.tensors) | {f"gram:{k}" for k in loaded.grams}
    assert loaded.grams and meta["gram_rows"] > 0
    assert main([*argv, "--estimator", "sample", "--out", str(out)]) == 2  # needs a count
