"""The retrieval files of a bundle: a user encoder, the output bias and an ANN index.

Exact serving (model.onnx) scores every item for every request, which stops
scaling at a few 10^5 items. For large catalogues the bundle also carries

    retrieval/user_encoder.onnx   item_ids int64 [batch, seq] -> user float32 [batch, D]
                                  (the state the output layer scores: z_j = W_j . h + b_j)
    retrieval/item_bias.npy       (N,) float32, b_j (the rows W_j are item_vectors.npy)
    retrieval/item_index.faiss    HNSW (L2) over x_j = [W_j, b_j, sqrt(R^2 - |[W_j, b_j]|^2)],
                                  R the largest norm: for the query q = [h, 1, 0],
                                  |q - x_j|^2 = |q|^2 + R^2 - 2 z_j, so the nearest
                                  items are those of the highest logits

The service (serving/retrieval.py) takes a shortlist from the index and
re-ranks it exactly with W and b, so every score it returns is the model's own
logit. faiss was chosen by measurement over usearch (docs/results/retrieval.md):
faster to build, faster to search and higher recall at the same settings.

Why the extra coordinate: an HNSW graph built with the inner product itself (not
a metric) leaves some items unreachable; on the retrieval benchmark's 7.7e4-item
model, recall@10 stayed at 0.968 whatever the shortlist (100 to 400), against
0.998 at 100 with this reduction of inner-product search to nearest neighbours
(Bachrach et al. 2014).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from merging.onnx_graph import ExportError, save_onnx
from serving.bundle import INDEX_KIND, ITEM_BIAS, ITEM_INDEX, RETRIEVAL_DIR, USER_ENCODER
from training.model import HiddenState, SequenceRecommender

# HNSW graph degree and build depth: recall >= 0.99 at shortlist 100 on the scale
# benchmark's catalogues (docs/results/retrieval.md); the index costs ~M * 8 bytes per item.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 128
# The user vectors of the encoder must match torch's states this closely.
ENCODER_MAX_ABS_DIFF = 1e-3


def scoring_vectors(model: SequenceRecommender) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) item rows W and (N,) biases b of the output layer, float32."""
    with torch.inference_mode():
        return (
            model.output_weight().float().numpy(),
            model.output_bias.detach().float().numpy().copy(),
        )


def export_retrieval(model: SequenceRecommender, folder: Path, histories: list[np.ndarray]) -> dict:
    """Write retrieval/ into a bundle's staging `folder`; the manifest's "retrieval" fields."""
    import faiss

    target = Path(folder) / RETRIEVAL_DIR
    target.mkdir(parents=True, exist_ok=True)
    export_user_encoder(model, target / USER_ENCODER)
    check_encoder(model, target / USER_ENCODER, histories)
    weight, bias = scoring_vectors(model)
    np.save(target / ITEM_BIAS, bias, allow_pickle=False)
    vectors = index_vectors(weight, bias)
    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M)  # L2
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    faiss.write_index(index, str(target / ITEM_INDEX))
    return {"index": INDEX_KIND, "m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}


def index_vectors(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(N, D + 2): [W_j, b_j, sqrt(R^2 - |[W_j, b_j]|^2)], L2 order = logit order."""
    rows = np.concatenate([weight, bias[:, None]], axis=1).astype(np.float64)
    norms = np.square(rows).sum(axis=1)
    lift = np.sqrt(np.maximum(norms.max() - norms, 0.0))
    return np.ascontiguousarray(np.concatenate([rows, lift[:, None]], axis=1), dtype=np.float32)


def export_user_encoder(model: SequenceRecommender, path: Path) -> None:
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
    example = torch.tensor([[0, 1, 2], [1, 2, 3]], dtype=torch.int64).clamp(
        max=model.config.num_items
    )
    shapes = ({0: batch, 1: seq},)
    save_onnx(HiddenState(model).eval(), (example,), shapes, ("item_ids",), ("user",), path)


def check_encoder(model: SequenceRecommender, path: Path, histories: list[np.ndarray]) -> None:
    """The exported encoder's user vectors equal torch's on the parity histories."""
    import onnxruntime as ort

    rows = [h for h in histories if len(h)]
    width = max(len(h) for h in rows)
    padded = np.zeros((len(rows), width), dtype=np.int64)  # left-padded, as the service sends
    for i, row in enumerate(rows):
        padded[i, width - len(row) :] = row
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (users,) = session.run(["user"], {"item_ids": padded})
    with torch.inference_mode():
        reference = model.hidden(torch.from_numpy(padded)).float().numpy()
    diff = float(np.abs(users - reference).max()) if len(users) else 0.0
    if not diff <= ENCODER_MAX_ABS_DIFF:
        raise ExportError(f"the user encoder does not match torch: max abs diff {diff:.3g}")
