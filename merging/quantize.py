"""The optional int8 graph: onnxruntime dynamic quantisation, accepted only if it stays close.

model.int8.onnx is a second file of the bundle, never a replacement of
model.onnx. It gets its own parity with torch (merging/export_parity.py) and its
NDCG@10 change against the float graph (full ranking, test split); the export
fails when it loses more than `INT8_MAX_NDCG_DROP`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from merging.bundle import INT8_FILE, MODEL_FILE
from merging.export_parity import measure_parity, ndcg_at_10
from merging.onnx_graph import ExportError, OnnxRecommender, quiet_tools
from training.evaluate import Evaluator
from training.model import SequenceRecommender
from training.splits import Split

log = logging.getLogger(__name__)

# The int8 graph may lose at most this much NDCG@10 (full ranking, test split).
INT8_MAX_NDCG_DROP = 0.01


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
