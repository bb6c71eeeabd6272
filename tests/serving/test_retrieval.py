"""ANN retrieval: the bundle's retrieval/ files, the shortlist re-ranked exactly, the rules, HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from merging.export import export_bundle
from serving.bundle import INDEX_KIND, ITEM_INDEX, RETRIEVAL_DIR, BundleError, load_bundle
from serving.model_process import ModelSpec
from serving.retrieval import RetrievalModel
from serving.runtime import OnnxModel, Row
from tests.serving_support import AUTH, publish, ready_server, server_settings
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData


@pytest.fixture(scope="module")
def ann_bundle(
    tmp_path_factory: pytest.TempPathFactory, trained_run: Path, small_data: SequenceData
) -> Path:
    """The tiny model exported with retrieval/ (the threshold lowered to its catalogue)."""
    out = tmp_path_factory.mktemp("ann") / "a1"
    export_bundle(trained_run, out, small_data, parity_sequences=32, retrieval_min_items=1)
    return out


def open_retrieval(folder: Path, shortlist: int = 10) -> RetrievalModel:
    bundle = load_bundle(folder)
    return RetrievalModel(folder, bundle.num_items, 1, 1, bundle.max_history, shortlist, 64)


def histories(data: SequenceData, count: int) -> list[np.ndarray]:
    return [h for h in data.split().test.histories if len(h)][:count]


def test_small_catalogues_get_no_retrieval_files(serving_bundle: Path) -> None:
    bundle = load_bundle(serving_bundle)
    assert not bundle.has_retrieval and not (serving_bundle / RETRIEVAL_DIR).exists()


def test_retrieval_files_are_part_of_the_verified_bundle(ann_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(ann_bundle)
    assert bundle.has_retrieval and bundle.manifest["retrieval"]["index"] == INDEX_KIND
    assert {f"{RETRIEVAL_DIR}/{ITEM_INDEX}"} <= set(bundle.manifest["files"])
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ann_bundle, corrupt)
    index = corrupt / RETRIEVAL_DIR / ITEM_INDEX
    index.write_bytes(index.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(BundleError, match=r"checksum|sha256"):
        load_bundle(corrupt)


def test_the_shortlist_is_reranked_with_the_models_own_logits(
    ann_bundle: Path, trained_run: Path, small_data: SequenceData
) -> None:
    model = load_run_checkpoint(trained_run).model.eval()
    ann = open_retrieval(ann_bundle)
    exact = OnnxModel(ann_bundle / "model.onnx", ann.num_items, 1, 1, ann.max_history)
    rows = [Row(h, 10, True) for h in histories(small_data, 64)]
    overlap = []
    for row, got, want in zip(rows, ann.run(rows), exact.run(rows), strict=True):
        with torch.no_grad():
            logits = model.logits(torch.from_numpy(row.history)[None])[0].numpy()
        np.testing.assert_allclose(got.scores, logits[got.ids - 1], rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(got.scores) <= 0) and len(got.ids) == 10
        assert not set(got.ids.tolist()) & set(row.history.tolist())  # exclude_seen
        overlap.append(len(set(got.ids.tolist()) & set(want.ids.tolist())) / 10)
    assert np.mean(overlap) >= 0.95, np.mean(overlap)


def test_rules_hold_and_k_answers_come_back_while_k_items_are_eligible(
    ann_bundle: Path, small_data: SequenceData
) -> None:
    ann = open_retrieval(ann_bundle, shortlist=10)
    n = ann.num_items
    history = histories(small_data, 1)[0]
    rng = np.random.default_rng(0)
    # Nearly everything excluded: the shortlist alone cannot hold k eligible items.
    keep = rng.choice(np.arange(1, n + 1), size=15, replace=False)
    exclude = np.setdiff1d(np.arange(1, n + 1), np.concatenate([keep, history]))
    blocked = keep[:3]
    (answer,) = ann.run([Row(history, 12, True, exclude)], blocked)
    assert sorted(answer.ids.tolist()) == sorted(np.setdiff1d(keep[3:], history).tolist())[:12]
    candidates = rng.choice(np.arange(1, n + 1), size=25, replace=False)
    (among,) = ann.run([Row(history, 5, False, np.asarray(candidates[:2]), candidates)])
    assert set(among.ids.tolist()) <= set(candidates[2:].tolist()) and len(among.ids) == 5


def test_the_service_answers_from_the_index(ann_bundle: Path, tmp_path: Path) -> None:
    spec = ModelSpec(str(ann_bundle / "model.onnx"), 1, 1, 1, 1, 1, 1, str(ann_bundle))
    assert spec.retrieval_folder == str(ann_bundle)
    publish(tmp_path, ann_bundle, "ann1")
    vocab = load_bundle(ann_bundle).vocab
    items = [vocab.external(i) for i in (1, 2, 3)]
    body = {"items": items, "k": 5, "exclude_items": [vocab.external(4)]}
    answers = {}
    for mode in ("auto", "exact"):
        with ready_server(server_settings(tmp_path, retrieval=mode)) as live:
            response = httpx.post(f"{live.url}/v1/recommendations", json=body, headers=AUTH)
            assert response.status_code == 200, response.text
            answers[mode] = [entry["item_id"] for entry in response.json()["items"]]
            info = httpx.get(f"{live.url}/v1/model", headers=AUTH).json()
            assert info["model_file"] == ("user_encoder.onnx" if mode == "auto" else "model.onnx")
    assert len(answers["auto"]) == 5 and not set(answers["auto"]) & {*items, vocab.external(4)}
    assert len(set(answers["auto"]) & set(answers["exact"])) >= 4


def test_nearest_lifted_vectors_are_the_highest_logits() -> None:
    """The index's L2 order over [W, b, lift] against [h, 1, 0] is the logit order, exactly."""
    from merging.retrieval_export import index_vectors

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(300, 8)).astype(np.float32) * rng.uniform(0.1, 2, (300, 1))
    bias = rng.normal(size=300).astype(np.float32)
    items = index_vectors(weight, bias)
    for user in rng.normal(size=(20, 8)).astype(np.float32):
        query = np.concatenate([user, [1.0, 0.0]]).astype(np.float32)
        logits = weight @ user + bias
        distances = np.square(items - query).sum(axis=1)
        assert list(np.argsort(distances)[:10]) == list(np.argsort(-logits)[:10])
