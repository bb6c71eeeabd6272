"""The exported graph: the inference path as one module with top-k, its ONNX export, running it.

Serving runs onnxruntime, not torch: the exported graph is the contract between
the merge job and the service (fishrec.bundle/1, docs/formats.md):

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

`OnnxRecommender` runs a graph in onnxruntime; `torch_scores` and `torch_topk`
run the same module eagerly in torch, the reference that merging/export_parity.py
checks every graph against.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from serving.runtime import Filters, graph_feed
from training.model import SequenceRecommender

# ONNX opset of the exported graph. 23 brings the Attention operator, which the
# exporter uses for scaled_dot_product_attention: about a third faster on CPU than
# the opset-20 decomposition (Where/Softmax/IsNaN over [B, heads, L, L]). Running it
# needs onnxruntime >= 1.23 (its CPU Attention kernel) and writes IR version 11.
OPSET = 23
INPUTS = ("item_ids", "k", "exclude_seen", "exclude_ids", "candidate_ids", "blocked_ids")
OUTPUTS = ("scores", "indices")
FULL_SCORES_OUTPUT = "all_scores"


class ExportError(ValueError):
    """The model cannot be exported, or the exported graph does not match torch."""


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

    Explicit dynamic batch, sequence and filter dimensions (`save_onnx`).
    """
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
    save_onnx(graph, example_inputs(model.config.num_items), shapes, INPUTS, outputs, path)
    return graph_info(path)


def save_onnx(
    module: nn.Module,
    example: tuple[Tensor, ...],
    shapes: tuple[Any, ...],
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    path: Path,
) -> None:
    """Export `module` with the torch.export-based exporter into one checked, reproducible file.

    There is no fallback to the TorchScript exporter: a module it cannot export is an error.
    """
    import onnx

    try:
        with quiet_tools():
            program = torch.onnx.export(
                module,
                example,
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=list(inputs),
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


# ---- running the graph: onnxruntime, and torch as the reference ------------------------


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
