"""From requests to answers: vocabulary mapping, limits, fallback, batching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.bundle import Bundle
from serving.metrics import Metrics
from serving.model_manager import ServingModel
from serving.runtime import NO_IDS, Ranked, Row
from serving.schemas import RecommendationRequest, SimilarItemsRequest
from serving.settings import Settings


class LimitExceeded(ValueError):
    """A request inside the schema's bounds but over a configured limit; `loc` names the field."""

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = loc


# A RecommendationResponse as JSON-ready data (schemas.py documents the shape).
Answer = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """What one request needs: a row for the model (or None), its filters and unknown ids."""

    row: Row | None  # None: no model run (the popular fallback, or nothing eligible)
    unknown: list[str]  # unknown ids of the history
    unknown_filter: list[str]  # unknown ids of exclude_items and candidates
    exclude: np.ndarray  # internal ids never to return
    candidates: np.ndarray | None  # return only among these (None: every item)
    fallback: bool  # answered with the popular items


def check_limits(
    request: RecommendationRequest, settings: Settings, bundle: Bundle, loc: list[str | int]
) -> None:
    """Configured limits that the schema cannot know (they depend on settings and the bundle)."""
    num_items = bundle.num_items
    max_k = min(settings.max_k, num_items)
    if request.k > max_k:
        raise LimitExceeded(
            [*loc, "k"],
            f"k is {request.k}; at most {max_k} (the limit is {settings.max_k}, "
            f"the catalogue has {num_items} items)",
        )
    if len(request.items) > settings.max_history:
        raise LimitExceeded(
            [*loc, "items"],
            f"the history has {len(request.items)} items; at most {settings.max_history} are "
            f"accepted (the model reads the newest ones)",
        )
    check_filter_limits(request, settings, loc)
    uses_filters = bool(request.exclude_items) or request.candidates is not None
    if uses_filters and not bundle.supports_filters:
        field = "exclude_items" if request.exclude_items else "candidates"
        raise LimitExceeded(
            [*loc, field],
            f"the serving bundle {bundle.run_id} was exported before per-request filters (its "
            "graph has no exclude_ids/candidate_ids inputs); re-export it to use them",
        )


def check_filter_limits(
    request: RecommendationRequest | SimilarItemsRequest, settings: Settings, loc: list[str | int]
) -> None:
    if len(request.exclude_items) > settings.max_exclude_items:
        raise LimitExceeded(
            [*loc, "exclude_items"],
            f"{len(request.exclude_items)} ids to exclude; at most {settings.max_exclude_items}",
        )
    if request.candidates is not None and len(request.candidates) > settings.max_candidates:
        raise LimitExceeded(
            [*loc, "candidates"],
            f"{len(request.candidates)} candidates; at most {settings.max_candidates}",
        )


@dataclass(frozen=True)
class EncodedFilters:
    """exclude_items and candidates in internal ids, with the ids the bundle does not know."""

    exclude: np.ndarray
    candidates: np.ndarray | None  # None: every item is a candidate
    unknown: list[str]


def encode_filters(
    bundle: Bundle, exclude_items: list[Any], candidates: list[Any] | None
) -> EncodedFilters:
    exclude, unknown = _encode(bundle, exclude_items)
    known_candidates = None
    if candidates is not None:
        known_candidates, unknown_candidates = _encode(bundle, candidates)
        unknown = list(dict.fromkeys(unknown + unknown_candidates))
    return EncodedFilters(exclude, known_candidates, unknown)


def _encode(bundle: Bundle, externals: list[Any]) -> tuple[np.ndarray, list[str]]:
    known, unknown = bundle.vocab.encode([str(item) for item in externals])
    return np.asarray(known, dtype=np.int64), list(dict.fromkeys(unknown))


def plan(request: RecommendationRequest, bundle: Bundle) -> Plan:
    """The request in the bundle's internal ids (after check_limits)."""
    history, unknown = _encode(bundle, request.items)
    if request.exclude_items or request.candidates is not None:
        filters = encode_filters(bundle, request.exclude_items, request.candidates)
        exclude, candidates, unknown_filter = filters.exclude, filters.candidates, filters.unknown
    else:  # the plain request: nothing to encode (this runs on the event loop per request)
        exclude, candidates, unknown_filter = NO_IDS, None, []
    if candidates is not None and not len(candidates):
        return Plan(None, unknown, unknown_filter, exclude, candidates, fallback=False)
    if not len(history):
        return Plan(None, unknown, unknown_filter, exclude, candidates, fallback=True)
    row = Row(history, request.k, request.exclude_seen, exclude, candidates)
    return Plan(row, unknown, unknown_filter, exclude, candidates, fallback=False)


def popular(bundle: Bundle, k: int, plan: Plan, blocked: np.ndarray) -> Ranked:
    """The most popular eligible items (the same rules as the graph's, applied in numpy)."""
    ids, scores = bundle.popular, bundle.popular_scores
    if len(plan.exclude) or len(blocked) or plan.candidates is not None:
        keep = ~np.isin(ids, np.concatenate([plan.exclude, blocked]))
        if plan.candidates is not None:
            keep &= np.isin(ids, plan.candidates)
        ids, scores = ids[keep], scores[keep]
    return Ranked(ids=ids[:k], scores=scores[:k])


NOTHING = Ranked(ids=np.zeros(0, dtype=np.int64), scores=np.zeros(0, dtype=np.float32))


def respond(bundle: Bundle, ranked: Ranked, plan: Plan) -> Answer:
    # Plain dicts, not model instances: the values come from a verified bundle, not from a
    # client, and building ~k+1 pydantic objects per request cost more than serialising them.
    external = bundle.vocab.external
    return {
        "items": [
            {"item_id": external(i), "score": s}
            for i, s in zip(ranked.ids.tolist(), ranked.scores.tolist(), strict=True)
        ],
        "model_version": bundle.run_id,
        "unknown_items": plan.unknown,
        "unknown_filter_items": plan.unknown_filter,
        "fallback": "popular" if plan.fallback else None,
    }


async def recommend(
    model: ServingModel, requests: list[RecommendationRequest], metrics: Metrics
) -> list[Answer]:
    """Answers for `requests`, all from `model`; known histories share the batcher's runs."""
    bundle = model.bundle
    plans = [plan(request, bundle) for request in requests]
    rows = [p.row for p in plans if p.row is not None]
    answers = iter(await model.batcher.submit(rows) if rows else [])
    responses = []
    model.answered.inc(len(requests))
    for request, p in zip(requests, plans, strict=True):
        if p.unknown or p.unknown_filter:
            metrics.unknown_items.inc(len(p.unknown) + len(p.unknown_filter))
        if request.exclude_items:
            metrics.filtered_requests.labels("exclude_items").inc()
        if request.candidates is not None:
            metrics.filtered_requests.labels("candidates").inc()
        if p.row is not None:
            responses.append(respond(bundle, next(answers), p))
        elif p.fallback:
            metrics.fallbacks.inc()
            responses.append(respond(bundle, popular(bundle, request.k, p, model.blocked()), p))
        else:
            responses.append(respond(bundle, NOTHING, p))
    return responses
