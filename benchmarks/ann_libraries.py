"""Which ANN library for the bundle's index: faiss against usearch, same HNSW settings.

    pip install usearch   # not a project dependency: only this comparison needs it
    python benchmarks/ann_libraries.py --items 200000 --clustered 0.7

--items vectors of dimension 65 (D 64 + the bias) drawn around 2,000 cluster
centres (--clustered sets how much; 0 is plain Gaussian, the hard case), 500
queries near the centres. Both libraries build an HNSW graph (M 32,
construction depth 128, inner product) on 2 threads, then answer one query at a
time on 1 thread for three search depths, each shortlist re-ranked exactly;
prints build seconds, recall@10 against exact top-10 and milliseconds per query.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

DIM, QUERIES, CENTRES = 65, 500, 2000
SETTINGS = ((64, 50), (128, 100), (256, 200))  # (search depth, shortlist)


def vectors(items: int, clustered: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(CENTRES, DIM)).astype(np.float32)
    noise = rng.normal(size=(items, DIM)).astype(np.float32)
    catalogue = centres[rng.integers(0, CENTRES, items)] * clustered + noise * 0.5
    queries = centres[rng.integers(0, CENTRES, QUERIES)] * clustered
    queries = queries + rng.normal(size=(QUERIES, DIM)).astype(np.float32) * 0.5
    return catalogue.astype(np.float32), queries.astype(np.float32)


def recall(found: list[np.ndarray], catalogue: np.ndarray, queries: np.ndarray) -> float:
    exact = np.argsort(-(queries @ catalogue.T), axis=1)[:, :10]
    hits = []
    for ids, query, truth in zip(found, queries, exact, strict=True):
        ids = ids[ids >= 0]
        top = ids[np.argsort(-(catalogue[ids] @ query))[:10]]
        hits.append(len(set(top.tolist()) & set(truth.tolist())) / 10)
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--clustered", type=float, default=0.7)
    args = parser.parse_args()
    import faiss
    import usearch.index  # pip install usearch: only this comparison needs it

    catalogue, queries = vectors(args.items, args.clustered)

    faiss.omp_set_num_threads(2)
    start = time.perf_counter()
    flat = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    flat.hnsw.efConstruction = 128
    flat.add(catalogue)
    faiss_build = time.perf_counter() - start
    start = time.perf_counter()
    graph = usearch.index.Index(
        ndim=DIM, metric="ip", dtype="f32", connectivity=32, expansion_add=128
    )
    graph.add(np.arange(args.items), catalogue, threads=2)
    usearch_build = time.perf_counter() - start
    print(f"{args.items} items: build faiss {faiss_build:.1f} s, usearch {usearch_build:.1f} s")

    faiss.omp_set_num_threads(1)
    for depth, shortlist in SETTINGS:
        flat.hnsw.efSearch = depth
        start = time.perf_counter()
        by_faiss = [flat.search(q[None], shortlist)[1][0] for q in queries]
        faiss_ms = 1000 * (time.perf_counter() - start) / QUERIES
        graph.expansion_search = depth
        start = time.perf_counter()
        by_usearch = [graph.search(q, shortlist, threads=1).keys.astype(np.int64) for q in queries]
        usearch_ms = 1000 * (time.perf_counter() - start) / QUERIES
        print(
            f"depth {depth}, shortlist {shortlist}: faiss recall@10 "
            f"{recall(by_faiss, catalogue, queries):.4f} in {faiss_ms:.2f} ms | usearch "
            f"{recall(by_usearch, catalogue, queries):.4f} in {usearch_ms:.2f} ms"
        )


if __name__ == "__main__":
    main()
