"""From requests to answers: vocabulary mapping, limits, fallback, batching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.bundle import Bundle
from serving.metrics import Metrics
from serving.reload import ServingModel
from serving.runtime import Ranked, Row
from serving.schemas import RecommendationRequest
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
    """What one request needs: a row for the model (or None: fallback) and its unknown ids."""

    row: Row | None
    unknown: list[str]


def check_limits(
    request: RecommendationRequest, settings: Settings, num_items: int, loc: list[str | int]
) -> None:
    """Configured limits that the schema cannot know (they depend on settings and the bundle)."""
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


def plan(request: RecommendationRequest, bundle: Bundle) -> Plan:
    known, unknown = bundle.vocab.encode([str(item) for item in request.items])
    unknown = list(dict.fromkeys(unknown))  # each unknown id once, in order of appearance
    if not known:
        return Plan(None, unknown)
    return Plan(Row(np.asarray(known, dtype=np.int64), request.k, request.exclude_seen), unknown)


def popular(bundle: Bundle, k: int) -> Ranked:
    return Ranked(ids=bundle.popular[:k], scores=bundle.popular_scores[:k])


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
        "fallback": None if plan.row is not None else "popular",
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
    for request, p in zip(requests, plans, strict=True):
        if p.unknown:
            metrics.unknown_items.inc(len(p.unknown))
        if p.row is None:
            metrics.fallbacks.inc()
            responses.append(respond(bundle, popular(bundle, request.k), p))
        else:
            responses.append(respond(bundle, next(answers), p))
    return responses
