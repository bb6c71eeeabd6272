"""Exporting a checkpoint as a model bundle: the folder serving reads (docs/export.md).

`export_bundle` writes the ONNX graph (merging/onnx_graph.py), checks it against
torch (merging/export_parity.py), optionally adds the int8 graph
(merging/quantize.py), and writes the vocabulary, popularity, item vectors and
manifest (merging/bundle.py) into a staging folder that replaces the target only
once every check passed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merging.bundle import (
    MODEL_FILE,
    POPULAR_FILE,
    VOCAB_FILE,
    popular_json,
    verify_bundle,
    write_manifest,
)
from merging.export_parity import (
    PARITY_MAX_ABS_DIFF,
    PARITY_MIN_TOPK_AGREEMENT,
    measure_parity,
    parity_histories,
)
from merging.onnx_graph import ExportError, OnnxRecommender, export_onnx
from merging.quantize import export_int8
from merging.retrieval_export import export_retrieval
from serving.bundle import ITEM_VECTORS, MANIFEST, RETRIEVAL_MIN_ITEMS
from training.checkpoint import write_checkpoint, write_json
from training.files import atomic_directory
from training.model import ModelConfig, SequenceRecommender
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData
from training.warm_start import BUNDLE_CHECKPOINT

log = logging.getLogger(__name__)

# Fields of the manifest that the caller (the job, the CLI) may set.
CALLER_FIELDS = frozenset({"run_id", "created", "recipes", "merge", "metrics"})


def max_history(config: ModelConfig) -> int:
    """How many of the newest history items the model reads (see `prediction_input`)."""
    return config.max_len if config.causal else config.max_len - 1


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
    retrieval_min_items: int | None = RETRIEVAL_MIN_ITEMS,
) -> dict:
    """Export a checkpoint (or run folder) as a bundle folder `out`; return its manifest.

    Writes model.onnx (+ model.int8.onnx with `quantize`), vocab.json, popular.json
    (training popularity of `data`'s split) and manifest.json into a staging folder
    that replaces `out` only once every check passed. `manifest_fields` sets the
    fields the caller owns (run_id, created, recipes, merge, metrics); run_id
    defaults to the name of `out` (bundles live in runs/<run_id>/). With
    `checkpoint_copy` the model's weights and config also go into checkpoint/
    (safetensors + JSON): what the next run warm-starts from (training/warm_start.py).
    A catalogue of at least `retrieval_min_items` items (None: never) also gets
    retrieval/: user encoder, output bias and ANN index (merging/retrieval_export.py).
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
        retrieval = None
        if retrieval_min_items is not None and config.num_items >= retrieval_min_items:
            retrieval = export_retrieval(model, staging, histories)
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
                "retrieval": retrieval,
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
        not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())
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
