"""Retrieval at catalogue scale: an ANN shortlist, re-ranked exactly.

For bundles that carry retrieval/ (merging/retrieval_export.py), the service
does not score every item: the user encoder turns a history into the state h
the output layer scores (z_j = W_j . h + b_j), the HNSW index returns the
`shortlist` items nearest to [h, 1, 0] (by construction the items of the
highest logits, merging/retrieval_export.py), and those are scored exactly with
W and b, so every returned score is the model's own logit.

Business rules hold as on the exact path: the history (exclude_seen),
`exclude_items` and unavailable items are never returned, `candidates` are
scored exactly among themselves (no index needed), and a row never gets fewer
than k answers while k eligible items exist: the shortlist is widened by the
number of banned items, and a row whose shortlist still falls short is scored
over the whole catalogue.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.bundle import (
    ITEM_BIAS,
    ITEM_INDEX,
    ITEM_VECTORS,
    RETRIEVAL_DIR,
    USER_ENCODER,
    BundleError,
)
from serving.runtime import (
    NO_IDS,
    Ranked,
    RankingModel,
    Row,
    left_padded,
    length_groups,
    open_session,
)

# The warm-up's unfiltered rows ask for this many items (the exact path asks for all).
WARM_K = 100


class RetrievalModel(RankingModel):
    """A bundle's user encoder, ANN index and output layer, with explicit threads."""

    def __init__(
        self,
        folder: Path,
        num_items: int,
        intra_op_threads: int,
        inter_op_threads: int,
        max_history: int,
        shortlist: int,
        ef_search: int,
    ) -> None:
        import faiss

        folder = Path(folder)
        self.path = folder / RETRIEVAL_DIR / USER_ENCODER
        self.num_items = num_items
        self.max_history = max_history
        self.shortlist = shortlist
        self.ef_search = ef_search
        self.filters = True
        self.warm_k = min(WARM_K, num_items)
        self.session = open_session(self.path, intra_op_threads, inter_op_threads)
        self.weight = np.load(folder / ITEM_VECTORS, allow_pickle=False)  # never pickle
        self.bias = np.load(folder / RETRIEVAL_DIR / ITEM_BIAS, allow_pickle=False)
        faiss.omp_set_num_threads(intra_op_threads)
        try:
            self.index = faiss.read_index(str(folder / RETRIEVAL_DIR / ITEM_INDEX))
        except RuntimeError as err:
            raise BundleError(f"{folder / RETRIEVAL_DIR / ITEM_INDEX}: not a faiss index") from err
        self.check_shapes()

    def check_shapes(self) -> None:
        n, dim = self.weight.shape
        if (n, self.bias.shape, self.index.ntotal, self.index.d) != (
            self.num_items,
            (self.num_items,),
            self.num_items,
            dim + 2,
        ):
            raise BundleError(
                f"{self.path.parent}: retrieval files disagree: {self.num_items} items, vectors "
                f"{self.weight.shape}, bias {self.bias.shape}, index of {self.index.ntotal} x "
                f"{self.index.d}"
            )
        (output,) = self.session.get_outputs()
        if output.name != "user" or output.shape[-1] != dim:
            raise BundleError(f"{self.path}: expected an output user [batch, {dim}]")

    def users(self, rows: list[Row]) -> np.ndarray:
        """(B, D) user states; rows of similar length share a session run."""
        users = np.zeros((len(rows), self.weight.shape[1]), dtype=np.float32)
        lengths = [min(len(row.history), self.max_history) for row in rows]
        for group in length_groups(lengths):
            histories = [rows[i].history[-self.max_history :] for i in group]
            (states,) = self.session.run(["user"], {"item_ids": left_padded(histories)})
            users[group] = states
        return users

    def run(self, rows: list[Row], blocked: np.ndarray = NO_IDS) -> list[Ranked]:
        users = self.users(rows)
        banned = [self.banned(row, blocked) for row in rows]
        shortlists = self.search(users, rows, banned)
        return [
            self.rank(row, user, row_banned, shortlist)
            for row, user, row_banned, shortlist in zip(
                rows, users, banned, shortlists, strict=True
            )
        ]

    def banned(self, row: Row, blocked: np.ndarray) -> np.ndarray:
        """Internal ids this row must never get back (sorted, unique)."""
        parts = [row.exclude, blocked] + ([row.history] if row.exclude_seen else [])
        ids = np.unique(np.concatenate(parts).astype(np.int64))
        return ids[ids > 0]

    def search(
        self, users: np.ndarray, rows: list[Row], banned: list[np.ndarray]
    ) -> list[np.ndarray | None]:
        """Each row's shortlist of internal ids (None: candidates or the whole catalogue)."""
        searched = [i for i, row in enumerate(rows) if row.candidates is None]
        out: list[np.ndarray | None] = [None] * len(rows)
        if not searched:
            return out
        # Widened by the banned ids, so that k eligible items remain among the shortlist.
        width = max(max(self.shortlist, rows[i].k + len(banned[i])) for i in searched)
        if width >= self.num_items:
            return out  # as good as scoring everything
        self.index.hnsw.efSearch = max(self.ef_search, width)
        ones, zeros = (np.full((len(searched), 1), v, dtype=np.float32) for v in (1.0, 0.0))
        queries = np.concatenate([users[searched], ones, zeros], axis=1)
        _, found = self.index.search(np.ascontiguousarray(queries), width)
        for position, i in enumerate(searched):
            ids = found[position]
            out[i] = ids[ids >= 0] + 1
        return out

    def rank(
        self, row: Row, user: np.ndarray, banned: np.ndarray, shortlist: np.ndarray | None
    ) -> Ranked:
        """Exact logits of the eligible items of the shortlist (or candidates), best k first."""
        if row.candidates is not None:
            pool = np.unique(row.candidates[row.candidates > 0])
        elif shortlist is not None:
            pool = shortlist
        else:
            pool = np.arange(1, self.num_items + 1, dtype=np.int64)
        pool = pool[~np.isin(pool, banned)]
        eligible = self.num_items - len(banned)
        if row.candidates is None and len(pool) < min(row.k, eligible):
            pool = np.setdiff1d(np.arange(1, self.num_items + 1), banned, assume_unique=True)
        scores = self.weight[pool - 1] @ user + self.bias[pool - 1]
        k = min(row.k, len(pool))
        if k == 0:
            return Ranked(ids=NO_IDS, scores=np.zeros(0, dtype=np.float32))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return Ranked(ids=pool[top].astype(np.int64), scores=scores[top].astype(np.float32))
