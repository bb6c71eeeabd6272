"""ONNX export: parity with torch, exclusion, k bounds, the bundle files, serving without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from merging import export, export_parity, onnx_graph, quantize
from merging.bundle import (
    BundleError,
    list_files,
    popular_json,
    verify_bundle,
    write_manifest,
)
from merging.export import export_bundle, max_history
from merging.export_parity import Parity, measure_parity, parity_histories
from merging.main import main
from merging.onnx_graph import ExportError, OnnxRecommender, check_k, torch_topk
from merging.quantize import export_int8
from tests.support import tiny_experiment
from training.batching import pad_left
from training.model import SequenceRecommender
from training.run import train
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData
from training.synthetic import SyntheticConfig, generate

SCORE_TOLERANCE = 1e-4  # the bound on |onnx - torch| per score
GAP = 1e-5  # torch scores closer than this may swap places in the graph's top-k


@pytest.fixture(scope="module")
def bert4rec_run(tmp_path_factory: pytest.TempPathFactory, small_data: SequenceData) -> Path:
    run = tmp_path_factory.mktemp("export-runs") / "bert4rec"
    train(tiny_experiment(model__backbone="bert4rec", train__epochs=1), small_data, run)
    return run


@pytest.fixture(scope="module")
def sasrec_bundle(
    tmp_path_factory: pytest.TempPathFactory, trained_run: Path, small_data: SequenceData
) -> Path:
    """SASRec with every option: int8 graph and the all_scores output."""
    out = tmp_path_factory.mktemp("bundles") / "sasrec-run"
    export_bundle(trained_run, out, small_data, quantize=True, full_scores=True)
    return out


@pytest.fixture(scope="module")
def bert4rec_bundle(
    tmp_path_factory: pytest.TempPathFactory, bert4rec_run: Path, small_data_dir: Path
) -> Path:
    """BERT4Rec through the CLI, top-k outputs only."""
    out = tmp_path_factory.mktemp("bundles") / "bert4rec-run"
    argv = ["export", "--checkpoint", str(bert4rec_run), "--out", str(out)]
    assert main([*argv, "--data", str(small_data_dir), "--run-id", "b4r-1"]) == 0
    return out


@pytest.fixture(scope="module", params=["sasrec", "bert4rec"])
def exported(
    request: pytest.FixtureRequest,
    trained_run: Path,
    bert4rec_run: Path,
    sasrec_bundle: Path,
    bert4rec_bundle: Path,
) -> tuple[SequenceRecommender, OnnxRecommender]:
    run, bundle = {
        "sasrec": (trained_run, sasrec_bundle),
        "bert4rec": (bert4rec_run, bert4rec_bundle),
    }[request.param]
    model = load_run_checkpoint(run).model.eval()
    return model, OnnxRecommender(bundle / "model.onnx", model.config.num_items)


def random_histories(rng: np.random.Generator, count: int, longest: int, items: int) -> list:
    """Histories of every length 0..longest (0 = a row of padding only), in random order."""
    lengths = np.resize(np.arange(longest + 1), count)
    rng.shuffle(lengths)
    return [rng.integers(1, items + 1, size=n) for n in lengths]


def reference_scores(
    model: SequenceRecommender, histories: list, exclude: np.ndarray
) -> np.ndarray:
    """The torch reference written out by hand: logits, then -inf on each excluded history item."""
    with torch.inference_mode():
        expected = model.logits(pad_left(histories)).numpy().copy()
    for row, history in enumerate(histories):
        if exclude[row]:
            expected[row, np.asarray(history, dtype=np.int64) - 1] = -np.inf
    return expected


def assert_same_topk(scores: np.ndarray, indices: np.ndarray, expected: np.ndarray, k: int) -> None:
    """Top-k scores within SCORE_TOLERANCE of torch's; ids identical up to torch-side ties."""
    top, top_ids = torch.topk(torch.from_numpy(expected), k, dim=1)
    top, top_ids = top.numpy(), top_ids.numpy() + 1
    np.testing.assert_allclose(scores, top, atol=SCORE_TOLERANCE, rtol=0)
    for row in range(len(indices)):
        assert len(set(indices[row].tolist())) == k
    # Where the ids differ, the graph's item must tie in torch with the item torch put there.
    picked = np.take_along_axis(expected, indices - 1, axis=1)
    swapped = indices != top_ids
    assert (np.abs(picked - top)[swapped] < GAP).all(), np.argwhere(swapped)


# ---- parity -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 64])
def test_topk_matches_torch_on_random_inputs(exported, batch: int) -> None:
    model, graph = exported
    rng = np.random.default_rng(batch)
    longest = max_history(model.config) + 5  # longer than the model reads: the graph cuts
    histories = random_histories(
        rng, 2 * batch if batch > 1 else 24, longest, model.config.num_items
    )
    for start in range(0, len(histories), batch):
        rows = histories[start : start + batch]
        exclude = rng.random(len(rows)) < 0.5
        out = graph.run(pad_left(rows).numpy(), 10, exclude)
        assert out["indices"].dtype == np.int64 and out["scores"].dtype == np.float32
        assert_same_topk(out["scores"], out["indices"], reference_scores(model, rows, exclude), 10)


def test_parity_on_real_histories(exported, small_data: SequenceData) -> None:
    model, graph = exported
    histories = parity_histories(small_data.split(), max_history(model.config), 96)
    parity = measure_parity(model, graph, histories)
    assert parity.passes(), parity
    assert parity.sequences == 96 and parity.topk_agreement == 1.0
    assert parity.max_abs_diff <= SCORE_TOLERANCE


def test_parity_histories_cover_the_edge_cases(small_data: SequenceData) -> None:
    histories = parity_histories(small_data.split(), 20, 64)
    lengths = [len(h) for h in histories]
    assert len(histories) == 64
    assert {0, 1, 20} <= set(lengths)
    assert max(lengths) > 20  # the graph's own truncation is exercised
    assert lengths[: export_parity.PARITY_SINGLE_ROWS].count(0) == 1  # padding alone, batch 1


def test_parity_check_detects_a_different_graph(
    trained_run: Path, bert4rec_bundle: Path, small_data
) -> None:
    model = load_run_checkpoint(trained_run).model.eval()  # SASRec, against the BERT4Rec graph
    graph = OnnxRecommender(bert4rec_bundle / "model.onnx", model.config.num_items)
    parity = measure_parity(model, graph, parity_histories(small_data.split(), 20, 16))
    assert not parity.passes()
    assert parity.max_abs_diff > 1e-2 and parity.topk_agreement < 1.0


@pytest.mark.parametrize("exclude", [False, True])
def test_all_padding_rows_stay_finite(exported, exclude: bool) -> None:
    model, graph = exported
    item_ids = np.zeros((3, 5), dtype=np.int64)
    out = graph.run(item_ids, model.config.num_items, np.full(3, exclude))
    assert np.isfinite(out["scores"]).all()
    expected = model.logits(torch.from_numpy(item_ids)).detach().numpy()
    np.testing.assert_allclose(
        onnx_graph.scatter_topk(out["scores"], out["indices"], model.config.num_items),
        expected,
        atol=SCORE_TOLERANCE,
        rtol=0,
    )


# ---- exclusion and k --------------------------------------------------------------------------


def test_exclusion_matches_the_torch_reference(exported) -> None:
    model, graph = exported
    n = model.config.num_items
    rng = np.random.default_rng(0)
    histories = random_histories(rng, 32, max_history(model.config) + 10, n)
    item_ids = pad_left(histories)
    exclude = np.arange(len(histories)) % 2 == 0
    expected = reference_scores(model, histories, exclude)
    actual = graph.all_scores(item_ids.numpy(), exclude)
    assert np.array_equal(np.isneginf(actual), np.isneginf(expected))
    assert not np.isneginf(actual[~exclude]).any()
    finite = np.isfinite(expected)
    assert np.abs(actual[finite] - expected[finite]).max() <= SCORE_TOLERANCE
    top = graph.run(item_ids.numpy(), 10, exclude)["indices"]
    for row in np.flatnonzero(exclude):
        assert not set(top[row].tolist()) & set(histories[row].tolist())


def test_k_bounds(exported) -> None:
    model, graph = exported
    n = model.config.num_items
    item_ids = np.array([[0, 3, 4], [5, 6, 7]], dtype=np.int64)
    keep = np.zeros(2, dtype=bool)
    for bad in (0, -1, n + 1, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            graph.run(item_ids, bad, keep)
        with pytest.raises(ValueError, match="k must be"):
            torch_topk(model, torch.from_numpy(item_ids), bad, torch.from_numpy(keep))
    out = graph.run(item_ids, n, keep)  # k == the catalogue: every item, ranked
    assert out["indices"].shape == (2, n)
    for row in out["indices"]:
        assert sorted(row.tolist()) == list(range(1, n + 1))
    assert (np.diff(out["scores"], axis=1) <= 0).all()
    assert check_k(np.int64(n), n) == n


# ---- the bundle -----------------------------------------------------------------------------


def test_bundle_files_and_manifest(sasrec_bundle: Path, small_data: SequenceData) -> None:
    manifest = verify_bundle(sasrec_bundle)
    assert manifest["schema"] == "fishrec.bundle/1"
    assert manifest["run_id"] == "sasrec-run"  # the folder name by default
    files = {"model.onnx", "model.int8.onnx", "vocab.json", "popular.json", "item_vectors.npy"}
    assert set(manifest["files"]) == files
    assert manifest["data_fingerprint"] == small_data.fingerprint
    assert manifest["num_items"] == small_data.num_items
    assert manifest["max_history"] == manifest["model"]["max_len"] == 20  # SASRec reads max_len
    assert manifest["recipes"] == ["sasrec"] and manifest["merge"] is None
    onnx_fields = manifest["onnx"]
    assert onnx_fields["file"] == "model.onnx" and onnx_fields["opset"] == onnx_graph.OPSET
    assert onnx_fields["ir_version"] >= 7
    import onnx
    import onnxruntime

    assert onnx_fields["onnx_version"] == onnx.__version__
    assert onnx_fields["onnxruntime_version"] == onnxruntime.__version__
    assert [i["name"] for i in onnx_fields["inputs"]] == [
        "item_ids",
        "k",
        "exclude_seen",
        "exclude_ids",
        "candidate_ids",
        "blocked_ids",
    ]
    assert onnx_fields["inputs"][0] == {
        "name": "item_ids",
        "type": "int64",
        "shape": ["batch", "seq"],
    }
    assert [o["shape"] for o in onnx_fields["outputs"]] == [
        ["batch", "k"],
        ["batch", "k"],
        ["batch", 200],
    ]
    assert onnx_fields["parity"]["passed"] is True and onnx_fields["parity"]["sequences"] == 256
    vocab = json.loads((sasrec_bundle / "vocab.json").read_text())
    assert vocab == small_data.vocab.to_json()
    popular = json.loads((sasrec_bundle / "popular.json").read_text())
    counts = small_data.split().popularity
    assert popular["schema"] == "fishrec.popular/1"
    assert sorted(popular["items"]) == list(range(1, small_data.num_items + 1))
    assert popular["counts"] == [int(counts[i]) for i in popular["items"]]
    assert popular["counts"] == sorted(popular["counts"], reverse=True)


def test_int8_graph_is_a_second_file_with_its_own_figures(sasrec_bundle: Path) -> None:
    import onnx

    manifest = verify_bundle(sasrec_bundle)
    quantized = manifest["quantized"]
    assert quantized["file"] == "model.int8.onnx"
    assert quantized["parity"]["sequences"] == 256
    assert 0.0 < quantized["parity"]["max_abs_diff"] < 1.0
    assert abs(quantized["ndcg@10_change"]) <= quantize.INT8_MAX_NDCG_DROP
    ops = {node.op_type for node in onnx.load(str(sasrec_bundle / "model.int8.onnx")).graph.node}
    float_ops = {node.op_type for node in onnx.load(str(sasrec_bundle / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops and "MatMulInteger" not in float_ops


def test_the_reading_side_accepts_the_bundle(sasrec_bundle: Path, bert4rec_bundle: Path) -> None:
    from serving.bundle import load_bundle

    for folder, run_id in ((sasrec_bundle, "sasrec-run"), (bert4rec_bundle, "b4r-1")):
        bundle = load_bundle(folder)
        assert bundle.run_id == run_id and bundle.num_items == 200
    assert load_bundle(bert4rec_bundle).max_history == 19  # BERT4Rec appends [MASK]
    assert load_bundle(bert4rec_bundle).manifest["quantized"] is None


def test_verify_bundle_finds_tampering(sasrec_bundle: Path, tmp_path: Path) -> None:
    def copy(name: str) -> Path:
        return Path(shutil.copytree(sasrec_bundle, tmp_path / name))

    edited = copy("edited")
    (edited / "popular.json").write_text((edited / "popular.json").read_text() + " ")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        verify_bundle(edited)
    extra = copy("extra")
    (extra / "notes.txt").write_text("written after the manifest")
    with pytest.raises(BundleError, match="unlisted"):
        verify_bundle(extra)
    wrong = copy("wrong-count")
    fields = {
        k: v
        for k, v in json.loads((wrong / "manifest.json").read_text()).items()
        if k not in ("schema", "files")
    }
    write_manifest(wrong, {**fields, "num_items": 199})
    with pytest.raises(BundleError, match="199"):
        verify_bundle(wrong)
    renamed = copy("renamed")
    write_manifest(renamed, {**fields, "onnx": {**fields["onnx"], "file": "other.onnx"}})
    with pytest.raises(BundleError, match=r"other\.onnx"):
        verify_bundle(renamed)
    with pytest.raises(BundleError, match="missing"):
        write_manifest(wrong, {"run_id": "x"})
    with pytest.raises(BundleError, match="plain folder name"):
        write_manifest(wrong, {**fields, "run_id": "../up"})


def test_popular_json_orders_by_count_then_id() -> None:
    document = popular_json(np.array([0, 5, 7, 5, 0]))
    assert document == {
        "schema": "fishrec.popular/1",
        "items": [2, 1, 3, 4],
        "counts": [7, 5, 5, 0],
    }


def test_write_manifest_lists_nested_files(tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(b"png")
    (tmp_path / "report.md").write_text("report")
    assert set(list_files(tmp_path)) == {"plots/a.png", "report.md"}


# ---- failures ----------------------------------------------------------------------------------


def test_export_fails_and_writes_nothing_when_parity_fails(
    trained_run: Path, sasrec_bundle: Path, small_data: SequenceData, tmp_path: Path, monkeypatch
) -> None:
    def reuse_graph(model, path: Path, *, full_scores: bool = False) -> dict:
        # The torch export itself is tested elsewhere; the path after it is what matters here.
        shutil.copy(sasrec_bundle / "model.onnx", path)
        return onnx_graph.graph_info(path)

    monkeypatch.setattr(export, "export_onnx", reuse_graph)
    monkeypatch.setattr(export, "measure_parity", lambda *args, **kw: Parity(0.5, 0.75, 16))
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="does not match torch"):
        export_bundle(trained_run, out, small_data, parity_sequences=16)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir()]  # no staging folder left behind


def test_int8_graph_too_lossy_is_refused(
    trained_run: Path, sasrec_bundle: Path, small_data: SequenceData, tmp_path: Path, monkeypatch
) -> None:
    shutil.copy(sasrec_bundle / "model.onnx", tmp_path / "model.onnx")
    model = load_run_checkpoint(trained_run).model.eval()
    graph = OnnxRecommender(tmp_path / "model.onnx", 200)
    monkeypatch.setattr(quantize, "INT8_MAX_NDCG_DROP", -1.0)  # demand a gain no graph makes
    histories = parity_histories(small_data.split(), 20, 16)
    with pytest.raises(ExportError, match="int8 graph loses too much"):
        export_int8(model, tmp_path, graph, small_data.split(), histories)


def test_export_refuses_bad_requests(
    trained_run: Path, small_data: SequenceData, tmp_path: Path
) -> None:
    other = generate(
        SyntheticConfig(seed=7, num_users=300, num_items=200, mean_length=20, max_length=40)
    )
    with pytest.raises(ExportError, match="trained on data"):
        export_bundle(trained_run, tmp_path / "a", other)
    folder = tmp_path / "not-a-bundle"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a bundle folder"):
        export_bundle(trained_run, folder, small_data)
    assert (folder / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="written by the export"):
        export_bundle(trained_run, tmp_path / "b", small_data, manifest_fields={"onnx": {}})


# ---- serving needs no torch ----------------------------------------------------------------------

NO_TORCH_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import numpy as np
    import onnxruntime
    try:
        import torch  # noqa: F401
        sys.exit("torch was importable")
    except ImportError:
        pass
    from serving.runtime import graph_feed  # the service's own feed, torch-free
    folder, ids, flags = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    out = {}
    for name in ("model.onnx", "model.int8.onnx"):
        session = onnxruntime.InferenceSession(f"{folder}/{name}", providers=["CPUExecutionProvider"])
        feed = graph_feed(session, np.array(ids), 5, np.array(flags, dtype=bool))
        scores, indices = session.run(["scores", "indices"], feed)
        out[name] = {"scores": scores.tolist(), "indices": indices.tolist()}
    print(json.dumps(out))
    """
)


def test_the_bundle_runs_in_a_process_without_torch(sasrec_bundle: Path, trained_run: Path) -> None:
    ids = [[0, 0, 3, 4, 5], [9, 8, 7, 6, 5], [0, 0, 0, 0, 0]]
    flags = [True, False, True]
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_TORCH_CHILD,
            str(sasrec_bundle),
            json.dumps(ids),
            json.dumps(flags),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    model = load_run_checkpoint(trained_run).model.eval()
    histories = [np.array([i for i in row if i]) for row in ids]
    assert_same_topk(
        np.array(out["model.onnx"]["scores"], dtype=np.float32),
        np.array(out["model.onnx"]["indices"]),
        reference_scores(model, histories, np.array(flags)),
        5,
    )
    int8 = np.array(out["model.int8.onnx"]["indices"])
    assert int8.shape == (3, 5) and int8.min() >= 1 and int8.max() <= 200
