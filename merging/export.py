"""ONNX export of the inference path, with top-k in the graph, verified against torch.

Serving runs onnxruntime, not torch: the exported graph is the contract between
the merge job and the service (fishrec.bundle/1, /work/notes/bundle.md):

    inputs   item_ids      int64 [batch, seq]  internal ids, 0 = padding, left-padded,
                                               oldest first; any seq >= 1
             k             int64 [1]           1 <= k <= num_items
             exclude_seen  bool  [batch]       per row: the items of its input history
                                               score -inf
    outputs  scores        float32 [batch, k]  descending
             indices       int64 [batch, k]    internal item ids 1..num_items
             all_scores    float32 [batch, num_items]  only with full_scores; column j
                                               is item j + 1, exclusions applied

Only the inference path is exported: `SequenceRecommender.logits` (which keeps
the newest `max_history` items itself, so the server may send longer histories)
wrapped in `TopKRecommender`, which adds the exclusion and an ONNX TopK. The
exclusion covers every item of the input row, also those older than
`max_history`. A row of padding only yields finite scores.

Every export is checked on real histories of the data against the torch model
(`measure_parity`); the export fails when the scores differ by more than
`PARITY_MAX_ABS_DIFF` or the top-k lists disagree beyond near-ties. The optional
int8 graph (onnxruntime dynamic quantisation) gets its own parity and its
NDCG@10 change (full ranking, test split); it is a second file, never a
replacement of model.onnx.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from merging.bundle import (
    INT8_FILE,
    MODEL_FILE,
    POPULAR_FILE,
    VOCAB_FILE,
    popular_json,
    verify_bundle,
    write_manifest,
)
from serving.bundle import ITEM_VECTORS
from serving.runtime import NO_IDS, Filters, graph_feed
from training.batching import pad_left
from training.checkpoint import write_checkpoint, write_json
from training.data import SequenceData, Split
from training.evaluate import Evaluator
from training.files import atomic_directory
from training.model import ModelConfig, SequenceRecommender
from training.trainer import load_run_checkpoint
from training.warm_start import BUNDLE_CHECKPOINT

log = logging.getLogger(__name__)

# ONNX opset of the exported graph. 23 brings the Attention operator, which the
# exporter uses for scaled_dot_product_attention: about a third faster on CPU than
# the opset-20 decomposition (Where/Softmax/IsNaN over [B, heads, L, L]). Running it
# needs onnxruntime >= 1.23 (its CPU Attention kernel) and writes IR version 11.
OPSET = 23
INPUTS = ("item_ids", "k", "exclude_seen", "exclude_ids", "candidate_ids", "blocked_ids")
OUTPUTS = ("scores", "indices")
FULL_SCORES_OUTPUT = "all_scores"

# Parity of the float graph with torch; the export fails outside these.
PARITY_MAX_ABS_DIFF = 1e-4  # on every finite score, and excluded (-inf) entries must match
PARITY_MIN_TOPK_AGREEMENT = 1.0  # share of rows whose top-k agrees up to near-ties
# Two torch scores closer than this are a tie: either order is a correct top-k.
TIE_TOLERANCE = PARITY_MAX_ABS_DIFF
PARITY_K = 10  # k of the top-k agreement check (capped at num_items)
PARITY_BATCH = 64
PARITY_SINGLE_ROWS = 4  # the first parity rows also run one at a time (batch 1)
# The int8 graph may lose at most this much NDCG@10 (full ranking, test split).
INT8_MAX_NDCG_DROP = 0.01

# Fields of the manifest that the caller (the job, the CLI) may set.
CALLER_FIELDS = frozenset({"run_id", "created", "recipes", "merge", "metrics"})


class ExportError(ValueError):
    """The model cannot be exported, or the exported graph does not match torch."""


def max_history(config: ModelConfig) -> int:
    """How many of the newest history items the model reads (see `prediction_input`)."""
    return config.max_len if config.causal else config.max_len - 1


def check_k(k: int, num_items: int) -> int:
    """`k` as an int, refused unless 1 <= k <= num_items (ONNX TopK fails beyond)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= num_items:
        raise ValueError(f"k must be between 1 and the {num_items} items of the catalogue, got {k}")
    return int(k)


@contextmanager
def quiet_tools() -> Iterator[None]:
    """Keep the export log readable while the exporter and the quantiser run.

    They log every graph pass at INFO (onnxscript, onnx_ir, and the quantiser
    straight on the root logger) and warn about what does not concern this graph
    (missing torchvision ops, merged axis names, pre-processing for calibration).
    Errors still surface: they raise. The root logger gets a filter, not a level,
    so records that other loggers propagate to it pass as before.
    """
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    root = logging.getLogger()

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        root.addFilter(errors_only)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
            yield
    finally:
        root.removeFilter(errors_only)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# ---- the exported module ----------------------------------------------------------------


class TopKRecommender(nn.Module):
    """The inference path as one module: history -> top-k items, optionally all scores."""

    def __init__(self, model: SequenceRecommender, full_scores: bool = False) -> None:
        super().__init__()
        self.model = model
        self.num_items = model.config.num_items
        self.full_scores = full_scores

    def forward(
        self,
        item_ids: Tensor,
        k: Tensor,
        exclude_seen: Tensor,
        exclude_ids: Tensor,
        candidate_ids: Tensor,
        blocked_ids: Tensor,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """Top-k of (B, L) histories; the three id inputs are 0-padded (0 is never an item).

        exclude_ids (B, E): never returned for that row; candidate_ids (B, C): a
        row with any non-zero id returns only among them; blocked_ids (U,): never
        returned for any row (items marked unavailable).
        """
        logits = self.model.logits(item_ids)  # (B, N)
        # A leading column for id 0 makes column i score item id i, so the ids
        # themselves index the scatters; padding ids land in column 0, which is dropped.
        padded = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)  # (B, 1 + N)
        seen = torch.where(exclude_seen[:, None], item_ids, torch.zeros_like(item_ids))  # (B, L)
        banned = torch.cat([seen, exclude_ids, blocked_ids.expand(item_ids.shape[0], -1)], dim=1)
        scores = padded.scatter(1, banned, float("-inf"))
        allowed = torch.zeros_like(padded).scatter(1, candidate_ids, 1.0) > 0  # (B, 1 + N)
        restricted = (candidate_ids > 0).any(dim=1, keepdim=True)  # (B, 1)
        scores = torch.where(restricted & ~allowed, float("-inf"), scores)[:, 1:]  # (B, N)
        count = k[0].item()
        torch._check(count >= 1)
        torch._check(count <= self.num_items)
        top, index = torch.topk(scores, count, dim=1)  # (B, k), descending
        if self.full_scores:
            return top, index + 1, scores
        return top, index + 1


def no_filters(batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """exclude_ids, candidate_ids, blocked_ids that change nothing (one padding id each)."""
    zeros = torch.zeros((batch, 1), dtype=torch.int64)
    return zeros, zeros, torch.zeros(1, dtype=torch.int64)


def example_inputs(num_items: int) -> tuple[Tensor, ...]:
    """Export-time example: every dynamic size >= 2, so the exporter specialises none of them."""
    item_ids = torch.tensor([[0, 1, 2], [1, 2, 3]], dtype=torch.int64).clamp(max=num_items)
    some = torch.tensor([[0, 1], [0, 0]], dtype=torch.int64).clamp(max=num_items)
    filters = (some, torch.zeros((2, 3), dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    return item_ids, torch.tensor([min(2, num_items)]), torch.tensor([True, False]), *filters


def export_onnx(model: SequenceRecommender, path: Path, *, full_scores: bool = False) -> dict:
    """Export `model`'s inference path to one ONNX file; return the manifest's "onnx" fields.

    Uses the torch.export-based exporter with explicit dynamic batch and sequence
    dimensions. There is no fallback to the TorchScript exporter: a model it
    cannot export is an error.
    """
    import onnx

    graph = TopKRecommender(model, full_scores).eval()
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1)
    excluded, candidates = (
        torch.export.Dim("excluded", min=1),
        torch.export.Dim("candidates", min=1),
    )
    blocked = torch.export.Dim("blocked", min=1)
    shapes = (
        {0: batch, 1: seq},
        None,
        {0: batch},
        {0: batch, 1: excluded},
        {0: batch, 1: candidates},
        {0: blocked},
    )
    outputs = (*OUTPUTS, FULL_SCORES_OUTPUT) if full_scores else OUTPUTS
    try:
        with quiet_tools():
            program = torch.onnx.export(
                graph,
                example_inputs(model.config.num_items),
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=list(INPUTS),
                output_names=list(outputs),
                opset_version=OPSET,
                verbose=False,
            )
    except Exception as err:
        raise ExportError(f"torch.onnx.export (dynamo) could not export the model: {err}") from err
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    name_k_dimension(proto)
    strip_debug_metadata(proto)
    onnx.checker.check_model(proto)
    # One self-contained file: a model past protobuf's 2 GiB limit fails here, loudly.
    onnx.save(proto, str(path))
    return graph_info(path)


def strip_debug_metadata(proto: Any) -> None:
    """Drop the exporter's per-node debug records (stack traces, FX names, object addresses).

    They change from process to process (addresses), so without this the same
    weights would not give the same file, and a resumed job's bundle would not
    equal an uninterrupted one's.
    """
    graphs = [proto.graph, *(f for f in proto.functions)]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    del proto.metadata_props[:]


def name_k_dimension(proto: Any) -> None:
    """Call the top-k outputs' second dimension "k" (the exporter names it after its symbol)."""
    for output in proto.graph.output:
        if output.name in OUTPUTS:
            output.type.tensor_type.shape.dim[1].dim_param = "k"


def graph_info(path: Path) -> dict[str, Any]:
    """The manifest's description of an ONNX file: versions, inputs and outputs."""
    import onnx
    import onnxruntime

    proto = onnx.load(str(path))
    opset = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    return {
        "file": Path(path).name,
        "opset": int(opset),
        "ir_version": int(proto.ir_version),
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "inputs": [_value_info(value) for value in proto.graph.input],
        "outputs": [_value_info(value) for value in proto.graph.output],
    }


def _value_info(value: Any) -> dict[str, Any]:
    import onnx

    tensor = value.type.tensor_type
    shape = [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return {"name": value.name, "type": dtype, "shape": shape}


# ---- running the graph (onnxruntime only) -----------------------------------------------


class OnnxRecommender:
    """An onnxruntime session over an exported graph, with the checks of the API."""

    def __init__(self, path: Path, num_items: int, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.num_items = num_items
        self.outputs = [output.name for output in self.session.get_outputs()]

    def run(
        self,
        item_ids: np.ndarray,
        k: int,
        exclude_seen: np.ndarray,
        filters: Filters | None = None,
    ) -> dict[str, np.ndarray]:
        """Graph outputs by name for left-padded `item_ids` (B, L)."""
        k = check_k(k, self.num_items)
        feed = graph_feed(self.session, item_ids, k, exclude_seen, filters)
        return dict(zip(self.outputs, self.session.run(None, feed), strict=True))

    def all_scores(
        self, item_ids: np.ndarray, exclude_seen: np.ndarray, filters: Filters | None = None
    ) -> np.ndarray:
        """(B, N) scores of every item, column j = item j + 1, from a top-k of all items."""
        out = self.run(item_ids, self.num_items, exclude_seen, filters)
        return scatter_topk(out["scores"], out["indices"], self.num_items)


def scatter_topk(scores: np.ndarray, indices: np.ndarray, num_items: int) -> np.ndarray:
    """Top-k lists (B, k) back into a (B, N) score matrix; items not listed get -inf."""
    full = np.full((scores.shape[0], num_items), -np.inf, dtype=np.float32)
    np.put_along_axis(full, indices - 1, scores, axis=1)
    return full


def torch_filters(filters: Filters | None, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    if filters is None:
        return no_filters(batch)
    return (
        torch.from_numpy(filters.exclude_ids),
        torch.from_numpy(filters.candidate_ids),
        torch.from_numpy(filters.blocked_ids),
    )


def torch_scores(
    model: SequenceRecommender,
    item_ids: Tensor,
    exclude_seen: Tensor,
    filters: Filters | None = None,
) -> Tensor:
    """The torch reference: (B, N) scores with the same exclusion and filters, in eager mode."""
    graph = TopKRecommender(model, full_scores=True).eval()
    k = torch.tensor([1])
    with torch.inference_mode():
        return graph(item_ids, k, exclude_seen, *torch_filters(filters, len(item_ids)))[2]


def torch_topk(
    model: SequenceRecommender,
    item_ids: Tensor,
    k: int,
    exclude_seen: Tensor,
    filters: Filters | None = None,
) -> tuple[Tensor, Tensor]:
    """The torch reference of the graph's (scores, indices) for `k` items."""
    count = check_k(k, model.config.num_items)
    graph = TopKRecommender(model).eval()
    extra = torch_filters(filters, len(item_ids))
    with torch.inference_mode():
        scores, indices = graph(item_ids, torch.tensor([count]), exclude_seen, *extra)
    return scores, indices


# ---- parity -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parity:
    """How an ONNX graph's outputs compare with torch on the same histories."""

    max_abs_diff: float  # over finite scores; inf when excluded (-inf) entries differ
    topk_agreement: float  # share of rows whose top-k is a correct top-k of torch's scores
    sequences: int

    def passes(self) -> bool:
        return (
            self.max_abs_diff <= PARITY_MAX_ABS_DIFF
            and self.topk_agreement >= PARITY_MIN_TOPK_AGREEMENT
        )

    def to_json(self, passed: bool) -> dict[str, Any]:
        return {
            "max_abs_diff": float(self.max_abs_diff),
            "topk_agreement": float(self.topk_agreement),
            "sequences": self.sequences,
            "passed": passed,
        }


def parity_histories(split: Split, history: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` real histories of varied length, for the parity check.

    The first rows are the edge cases (length 1, exactly `history`, a row of
    padding only, the longest history of the data uncut, which the graph must
    truncate itself); then random cuts of random users, with more padding rows.
    """
    if count < 2 * PARITY_SINGLE_ROWS:
        raise ValueError(f"parity needs at least {2 * PARITY_SINGLE_ROWS} sequences, got {count}")
    pool = [h for h in split.test.histories if len(h)]
    if not pool:
        raise ExportError("the data has no non-empty test history to check parity on")
    rng = np.random.default_rng(seed)
    longest = max(pool, key=len)
    empty = np.zeros(0, dtype=np.int64)
    rows = [pool[int(rng.integers(len(pool)))][-1:], longest[-history:], empty, longest]
    rest = []
    for _ in range(count - len(rows)):
        if rng.random() < 1 / 16:
            rest.append(empty)
            continue
        source = pool[int(rng.integers(len(pool)))]
        rest.append(source[-int(rng.integers(1, history + 1)) :])
    return rows + rest


def parity_batches(histories: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The first rows one at a time (batch 1), the rest in batches of mixed lengths."""
    singles = [[h] for h in histories[:PARITY_SINGLE_ROWS]]
    rest = histories[PARITY_SINGLE_ROWS:]
    return singles + [rest[i : i + PARITY_BATCH] for i in range(0, len(rest), PARITY_BATCH)]


def measure_parity(
    model: SequenceRecommender,
    graph: OnnxRecommender,
    histories: list[np.ndarray],
    k: int = PARITY_K,
    seed: int = 0,
) -> Parity:
    """Compare `graph` with torch on `histories`, half of the rows with exclusion.

    Scores: every item's score (a top-k over all items, scattered back), plus the
    top-k scores and, when the graph has it, its all_scores output. Top-k: a row
    agrees when the graph's items are distinct and their torch scores equal the
    torch top-k scores within TIE_TOLERANCE (so near-ties may come in any order).
    """
    k = min(k, graph.num_items)
    rng = np.random.default_rng(seed)
    worst, agreeing = 0.0, 0
    for number, rows in enumerate(parity_batches(histories)):
        item_ids = pad_left(rows)
        exclude = torch.from_numpy(rng.random(len(rows)) < 0.5)
        filters = random_filters(rng, len(rows), graph.num_items) if number % 2 else None
        expected = torch_scores(model, item_ids, exclude, filters).numpy()  # (B, N)
        ids, flags = item_ids.numpy(), exclude.numpy()
        worst = max(worst, score_diff(graph.all_scores(ids, flags, filters), expected))
        out = graph.run(ids, k, flags, filters)
        reference = -np.sort(-expected, axis=1)[:, :k]
        worst = max(worst, score_diff(out["scores"], reference))
        if FULL_SCORES_OUTPUT in out:
            worst = max(worst, score_diff(out[FULL_SCORES_OUTPUT], expected))
        agreeing += int(topk_agrees(out["indices"], expected, reference).sum())
    return Parity(worst, agreeing / len(histories), len(histories))


def random_filters(rng: np.random.Generator, batch: int, num_items: int) -> Filters:
    """Exclusions on every row, candidates on half of them, a few blocked items."""
    excluded = [rng.integers(0, num_items + 1, size=int(rng.integers(0, 8))) for _ in range(batch)]
    candidates = [
        rng.integers(1, num_items + 1, size=int(rng.integers(1, 4 * PARITY_K)))
        if rng.random() < 0.5
        else NO_IDS
        for _ in range(batch)
    ]
    blocked = rng.integers(1, num_items + 1, size=int(rng.integers(0, 4)))
    return Filters.of_rows(excluded, candidates, blocked)


def score_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    """Max abs difference over finite entries; inf when the non-finite entries differ."""
    finite = np.isfinite(expected)
    if not np.array_equal(np.isfinite(actual), finite) or not np.array_equal(
        actual[~finite], expected[~finite]
    ):
        return float("inf")
    return float(np.abs(actual[finite] - expected[finite]).max(initial=0.0))


def topk_agrees(indices: np.ndarray, expected: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(B,) bool: the graph's top-k ids are a correct top-k of the torch scores, ties allowed."""
    num_items = expected.shape[1]
    valid = ((indices >= 1) & (indices <= num_items)).all(1)
    distinct = np.array([len(set(row)) == len(row) for row in indices.tolist()])
    picked = np.take_along_axis(expected, np.clip(indices - 1, 0, num_items - 1), axis=1)
    picked = -np.sort(-picked, axis=1)
    with np.errstate(invalid="ignore"):  # -inf - -inf: both excluded, equal by the first test
        close = (picked == reference) | (np.abs(picked - reference) <= TIE_TOLERANCE)
    return valid & distinct & close.all(1)


def ndcg_at_10(graph: OnnxRecommender, evaluator: Evaluator) -> float:
    """NDCG@10 of the graph on the test split, full ranking with history excluded."""

    def score(histories: Tensor) -> Tensor:
        keep = np.zeros(histories.shape[0], dtype=np.bool_)  # the evaluator excludes itself
        return torch.from_numpy(graph.all_scores(histories.numpy(), keep))

    return evaluator.evaluate(score, "test").metrics["full"]["ndcg@10"]


# ---- int8 ---------------------------------------------------------------------------------


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the MatMul and Gather weights (onnxruntime.quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Named op types: the quantiser would otherwise rewrite ONNX Attention (opset 23)
    # as com.microsoft QAttention, which rejects its attributes.
    with quiet_tools():
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=["MatMul", "Gather"],
            weight_type=QuantType.QInt8,
        )


def export_int8(
    model: SequenceRecommender,
    folder: Path,
    float_graph: OnnxRecommender,
    split: Split,
    histories: list[np.ndarray],
) -> dict[str, Any]:
    """model.int8.onnx next to model.onnx, with its parity and NDCG@10 change; fails if too lossy."""
    quantize_int8(folder / MODEL_FILE, folder / INT8_FILE)
    graph = OnnxRecommender(folder / INT8_FILE, float_graph.num_items)
    parity = measure_parity(model, graph, histories)
    evaluator = Evaluator(split)
    change = ndcg_at_10(graph, evaluator) - ndcg_at_10(float_graph, evaluator)
    log.info(
        "int8 graph: max abs diff %.3g, top-k agreement %.3f, NDCG@10 change %+.4f",
        parity.max_abs_diff,
        parity.topk_agreement,
        change,
    )
    if not np.isfinite(parity.max_abs_diff) or change < -INT8_MAX_NDCG_DROP:
        raise ExportError(
            f"the int8 graph loses too much: NDCG@10 change {change:+.4f} (limit "
            f"-{INT8_MAX_NDCG_DROP}), max abs diff {parity.max_abs_diff:.3g}; export without "
            "quantisation"
        )
    return {"file": INT8_FILE, "parity": parity.to_json(True), "ndcg@10_change": float(change)}


# ---- the bundle ---------------------------------------------------------------------------


def export_bundle(
    checkpoint: Path,
    out: Path,
    data: SequenceData,
    *,
    quantize: bool = False,
    full_scores: bool = False,
    manifest_fields: dict | None = None,
    parity_sequences: int = 256,
    checkpoint_copy: bool = False,
) -> dict:
    """Export a checkpoint (or run folder) as a bundle folder `out`; return its manifest.

    Writes model.onnx (+ model.int8.onnx with `quantize`), vocab.json, popular.json
    (training popularity of `data`'s split) and manifest.json into a staging folder
    that replaces `out` only once every check passed. `manifest_fields` sets the
    fields the caller owns (run_id, created, recipes, merge, metrics); run_id
    defaults to the name of `out` (bundles live in runs/<run_id>/). With
    `checkpoint_copy` the model's weights and config also go into checkpoint/
    (safetensors + JSON): what the next run warm-starts from (training/warm_start.py).
    """
    out = Path(out)
    fields = caller_fields(out, manifest_fields or {})
    _check_target(out)
    loaded = load_run_checkpoint(checkpoint)
    _check_data(checkpoint, loaded.config, loaded.info, data)
    model, config = loaded.model.eval(), loaded.config
    if "recipes" not in fields:
        fields["recipes"] = [loaded.info["recipe"]] if loaded.info.get("recipe") else []
    split = data.split()
    histories = parity_histories(split, max_history(config), parity_sequences)
    with atomic_directory(out) as staging:
        staging.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
        onnx_fields = export_onnx(model, staging / MODEL_FILE, full_scores=full_scores)
        graph = OnnxRecommender(staging / MODEL_FILE, config.num_items)
        parity = measure_parity(model, graph, histories)
        log.info(
            "parity with torch on %d sequences: max abs diff %.3g, top-k agreement %.3f",
            parity.sequences,
            parity.max_abs_diff,
            parity.topk_agreement,
        )
        if not parity.passes():
            raise ExportError(
                f"the ONNX graph does not match torch: max abs diff {parity.max_abs_diff:.3g} "
                f"(limit {PARITY_MAX_ABS_DIFF}), top-k agreement {parity.topk_agreement:.4f} "
                f"(limit {PARITY_MIN_TOPK_AGREEMENT})"
            )
        onnx_fields["parity"] = parity.to_json(True)
        quantized = export_int8(model, staging, graph, split, histories) if quantize else None
        data.vocab.save(staging / VOCAB_FILE)
        np.save(staging / ITEM_VECTORS, item_vectors(model), allow_pickle=False)
        if checkpoint_copy:
            write_checkpoint(staging / BUNDLE_CHECKPOINT, model, config, loaded.info)
        write_json(staging / POPULAR_FILE, popular_json(split.popularity))
        manifest = write_manifest(
            staging,
            {
                "merge": None,
                "metrics": None,
                **fields,
                "data_fingerprint": data.fingerprint,
                "model": config.to_dict(),
                "num_items": config.num_items,
                "max_history": max_history(config),
                "onnx": onnx_fields,
                "quantized": quantized,
            },
        )
        verify_bundle(staging)
    log.info("wrote bundle %s (run id %s)", out, manifest["run_id"])
    return manifest


def item_vectors(model: SequenceRecommender) -> np.ndarray:
    """(N, D) float32: the representation of each item the output layer scores against."""
    with torch.inference_mode():
        return model.output_weight().float().numpy()


def caller_fields(out: Path, fields: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(fields) - CALLER_FIELDS)
    if unknown:
        raise ValueError(
            f"manifest_fields may set {sorted(CALLER_FIELDS)}; {unknown} are written by the export"
        )
    return {"run_id": out.name, **fields}


def _check_target(out: Path) -> None:
    # The export replaces `out` whole: refuse to replace a folder that is not a bundle.
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())
    ):
        raise ExportError(f"{out} exists and is not a bundle folder; choose a new or empty --out")


def _check_data(
    checkpoint: Path, config: ModelConfig, info: dict[str, Any], data: SequenceData
) -> None:
    if config.num_items != data.num_items:
        raise ExportError(
            f"{checkpoint}: the model scores {config.num_items} items, the data has {data.num_items}"
        )
    fingerprint = info.get("data_fingerprint")
    if fingerprint and fingerprint != data.fingerprint:
        raise ExportError(f"{checkpoint}: trained on data {fingerprint}, not on {data.fingerprint}")
