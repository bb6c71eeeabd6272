"""The embedded default data set: synthetic sessions with the structure of real logs.

What makes it a useful test bed rather than noise:

- **Popularity** is Zipf-like, so MostPop is a fair (and beatable) baseline.
- **Topics**: items fall into latent topics; every user has a Dirichlet
  preference over topics that drifts during the sequence, so long-range
  context (which topics this user likes now) carries signal.
- **Transitions**: every item has a few likely successors, mostly in its own
  topic, and users often continue the topic of one of their recent items, so
  the last few items predict the next one (what a sequence model exploits).
- **Few repeats**: an item already in the sequence is redrawn, except with a
  small probability.

Every user is generated in lockstep, one position at a time over all users,
so the default (3000 users, ~115k interactions) takes a fraction of a second.
The result is built with `build_sequences`, so it carries a vocabulary and a
fingerprint like any prepared data set; external ids read "u5" and "i17".

This module holds the generative model (the catalogue from `draw_catalogue`,
the per-position generation in `generate_users`) and the in-memory data set
(`generate`), which keeps its draws over every user at once, so its output
never changes. Large versions (10^6-10^7 users) are streamed to Parquet by
training/synthetic_log.py from the same model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.interactions import Interactions
from training.prepare import build_sequences
from training.sequence_data import SequenceData

logger = logging.getLogger(__name__)


class SyntheticConfig(BaseModel):
    """Knobs of the generator; the defaults train a 2-layer, 64-wide model in minutes on CPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(0, description="seed of every random draw: same seed, same data")
    num_users: int = Field(3000, ge=1, description="number of users (sequences)")
    num_items: int = Field(
        1200, ge=10, description="catalogue size (rarely drawn items may be absent)"
    )
    num_topics: int = Field(24, ge=1, description="latent topics the items are grouped in")
    mean_length: float = Field(40.0, gt=0, description="mean sequence length before clipping")
    min_length: int = Field(
        5, ge=3, description="shortest sequence (3+ so every user is evaluated)"
    )
    max_length: int = Field(100, ge=3, description="longest sequence")
    zipf_exponent: float = Field(1.0, ge=0.0, description="item popularity ∝ 1 / rank**exponent")
    user_concentration: float = Field(
        0.3, gt=0, description="Dirichlet α of user topic preferences (small: few topics per user)"
    )
    drift_rate: float = Field(
        0.05, ge=0, le=1, description="per-step probability that a user's preference moves"
    )
    drift_weight: float = Field(
        0.3, ge=0, le=1, description="share of a fresh Dirichlet draw mixed in when it moves"
    )
    num_successors: int = Field(3, ge=1, description="likely successors of every item")
    successor_decay: float = Field(
        0.6, gt=0, le=1, description="successor j is chosen with weight decay**j"
    )
    cross_topic_successors: float = Field(
        0.15, ge=0, le=1, description="probability that a successor comes from any topic"
    )
    p_successor: float = Field(0.30, ge=0, le=1, description="next item: a successor of the last")
    p_recent_topic: float = Field(
        0.35, ge=0, le=1, description="next item: from the topic of one of the recent items"
    )
    recent_window: int = Field(3, ge=1, description="how many recent items 'recent' means")
    p_noise: float = Field(0.05, ge=0, le=1, description="next item: by global popularity")
    repeat_probability: float = Field(
        0.02, ge=0, le=1, description="chance that an already seen item is kept, not redrawn"
    )
    max_redraws: int = Field(5, ge=0, description="redraws of a seen item before it is kept")

    @model_validator(mode="after")
    def _consistent(self) -> SyntheticConfig:
        # The rest of the probability mass goes to the user's (drifting) topic preference.
        if self.p_successor + self.p_recent_topic + self.p_noise > 1 + 1e-9:
            raise ValueError("p_successor + p_recent_topic + p_noise must not exceed 1")
        if not self.min_length <= self.mean_length <= self.max_length:
            raise ValueError("need min_length <= mean_length <= max_length")
        if self.num_topics > self.num_items:
            raise ValueError("need at least one item per topic")
        return self


def _search(cdf: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """np.searchsorted(cdf, keys, side="right"), sped up for large catalogues.

    Random keys into a table larger than the cache miss it at every step of
    the binary search; sorted keys walk it in order, 3-4x faster for a million
    items, sort included. The answers are the same either way.
    """
    if len(cdf) < 1 << 16 or len(keys) < 1 << 10:
        return np.searchsorted(cdf, keys, side="right")
    order = np.argsort(keys)
    found = np.empty(len(keys), dtype=np.intp)
    found[order] = np.searchsorted(cdf, keys[order], side="right")
    return found


@dataclass(frozen=True)
class _Catalogue:
    """Items, their topics and popularity, arranged for vectorised sampling."""

    topic_of: np.ndarray  # (I,) topic of every item
    by_topic: np.ndarray  # (I,) item ids sorted by topic
    topic_cdf: np.ndarray  # (I,) topic + within-topic cumulative probability, increasing
    global_cdf: np.ndarray  # (I,) cumulative popularity over all items
    successors: np.ndarray  # (I, S) likely next items of every item
    successor_cdf: np.ndarray  # (S,) cumulative choice weights of successor j

    def in_topic(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One popularity-weighted item of each given topic.

        topic_cdf runs from t to t+1 over topic t's items, so topic + U(0,1)
        lands inside the topic's stretch: one searchsorted serves every topic.
        """
        keys = topics + rng.random(len(topics))
        # The minimum guards the last topic against a key rounded up to exactly t + 1.
        index = np.minimum(_search(self.topic_cdf, keys), len(self.by_topic) - 1)
        return self.by_topic[index]

    def popular(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return _search(self.global_cdf, rng.random(n))

    def successor(self, last: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        choice = np.searchsorted(self.successor_cdf, rng.random(len(last)), side="right")
        return self.successors[last, choice]


def draw_catalogue(config: SyntheticConfig, rng: np.random.Generator) -> _Catalogue:
    num_items, num_topics = config.num_items, config.num_topics
    # Balanced topics (every topic non-empty), shuffled so topic and id are unrelated.
    topic_of = rng.permutation(np.arange(num_items) % num_topics)
    weight = 1.0 / (rng.permutation(num_items) + 1.0) ** config.zipf_exponent
    by_topic = np.lexsort((np.arange(num_items), topic_of))
    # by_topic holds each topic's items in one stretch, so the loop is O(I + T), not O(I T).
    # Each stretch gets its own cumsum (a global cumsum minus offsets would round
    # differently), which keeps every data set bit for bit what it was.
    ends = np.cumsum(np.bincount(topic_of, minlength=num_topics)).tolist()
    sorted_weight = weight[by_topic]
    topic_cdf = np.empty(num_items)
    for topic, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        share = np.cumsum(sorted_weight[start:end])
        topic_cdf[start:end] = topic + share / share[-1]
        topic_cdf[end - 1] = topic + 1.0  # exact end, whatever the rounding
    global_cdf = np.cumsum(weight) / weight.sum()
    global_cdf[-1] = 1.0
    # Two steps: successors are drawn with the catalogue's own samplers.
    catalogue = _Catalogue(topic_of, by_topic, topic_cdf, global_cdf, np.empty(0), np.empty(0))
    successors = _successors(config, catalogue, rng)
    decay = config.successor_decay ** np.arange(config.num_successors)
    successor_cdf = np.cumsum(decay) / decay.sum()
    successor_cdf[-1] = 1.0
    return dataclasses.replace(catalogue, successors=successors, successor_cdf=successor_cdf)


def _successors(
    config: SyntheticConfig, catalogue: _Catalogue, rng: np.random.Generator
) -> np.ndarray:
    """(I, S) successors: popularity-weighted, in the item's topic unless crossing over."""
    shape = (config.num_items, config.num_successors)
    own_topic = np.repeat(catalogue.topic_of, config.num_successors)
    in_topic = catalogue.in_topic(own_topic, rng).reshape(shape)
    anywhere = catalogue.popular(in_topic.size, rng).reshape(shape)
    cross = rng.random(shape) < config.cross_topic_successors
    successors = np.where(cross, anywhere, in_topic)
    # An item is not its own successor: that would be a repeat.
    itself = successors == np.arange(config.num_items)[:, None]
    successors[itself] = (successors[itself] + 1) % config.num_items
    return successors


def _lengths(config: SyntheticConfig, num_users: int, rng: np.random.Generator) -> np.ndarray:
    """Right-skewed lengths (gamma, shape 2) with the configured mean, clipped to the range."""
    extra = config.mean_length - config.min_length
    drawn = config.min_length + rng.gamma(2.0, extra / 2.0, size=num_users)
    return np.clip(np.rint(drawn), config.min_length, config.max_length).astype(np.int64)


class _Users:
    """The state of a batch of users while generating: preferences and items so far."""

    def __init__(self, config: SyntheticConfig, num_users: int, rng: np.random.Generator) -> None:
        self.config = config
        alpha = np.full(config.num_topics, config.user_concentration)
        self.preference = rng.dirichlet(alpha, size=num_users)  # (B, T)
        self.items = np.zeros((num_users, config.max_length), dtype=np.int64)  # (B, L)

    def seen(self, step: int, chosen: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Whether user rows[k] (by default: user k) has chosen[k] among its first `step` items.

        A scan of the items so far, O(B L) memory: a (users, items) table of
        seen items would be O(B I), a gigabyte for 1000 users of a million items.
        """
        before = self.items[: len(chosen), :step] if rows is None else self.items[rows, :step]
        return (before == chosen[:, None]).any(axis=1)

    def preferred_topics(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cdf = np.cumsum(self.preference[rows], axis=1)  # (B, T)
        draws = rng.random(len(rows))[:, None] * cdf[:, -1:]
        return np.minimum((cdf <= draws).sum(axis=1), self.config.num_topics - 1)

    def drift(self, active: int, rng: np.random.Generator) -> None:
        """Move the preferences of some of the first `active` users."""
        config = self.config
        moving = np.flatnonzero(rng.random(active) < config.drift_rate)
        fresh = rng.dirichlet(np.full(config.num_topics, config.user_concentration), len(moving))
        weight = config.drift_weight
        self.preference[moving] = (1 - weight) * self.preference[moving] + weight * fresh


def _propose(
    step: int, rows: np.ndarray, users: _Users, catalogue: _Catalogue, rng: np.random.Generator
) -> np.ndarray:
    """A candidate next item at position `step` for each user in `rows`."""
    config = users.config
    topic_items = catalogue.in_topic(users.preferred_topics(rows, rng), rng)
    if step == 0:
        return topic_items
    last = users.items[rows, step - 1]
    back = rng.integers(1, min(step, config.recent_window) + 1, size=len(rows))
    recent_topics = catalogue.topic_of[users.items[rows, step - back]]
    options = np.stack(
        [
            catalogue.successor(last, rng),
            catalogue.in_topic(recent_topics, rng),
            catalogue.popular(len(rows), rng),
            topic_items,
        ]
    )  # (4, B)
    mode_cdf = np.cumsum([config.p_successor, config.p_recent_topic, config.p_noise])
    mode = np.searchsorted(mode_cdf, rng.random(len(rows)), side="right")
    return options[mode, np.arange(len(rows))]


def generate_users(
    config: SyntheticConfig,
    catalogue: _Catalogue,
    num_users: int,
    rng: np.random.Generator,
    pad_to_longest: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """`num_users` users, one position at a time: (B,) lengths and their items, user after user.

    Items are 0-based generator ids. With `pad_to_longest` (the in-memory
    data set, whose draws must not change) every user is carried to the
    longest length and the surplus dropped. Without it users are visited
    longest first and each stops at its own length: another stream of draws
    from the same model, 2.5x less work with the default lengths (mean 40,
    at most 100).
    """
    lengths = _lengths(config, num_users, rng)
    users = _Users(config, num_users, rng)
    # Row r of `users` is user order[r]; the active users are always rows 0..active-1.
    order = np.arange(num_users) if pad_to_longest else np.argsort(-lengths, kind="stable")
    row_lengths = lengths[order]
    for step in range(int(lengths.max())):
        active = num_users if pad_to_longest else int(np.count_nonzero(row_lengths > step))
        rows = np.arange(active)
        chosen = _propose(step, rows, users, catalogue, rng)
        repeat = users.seen(step, chosen)
        for _ in range(config.max_redraws):
            redraw = rows[repeat & (rng.random(active) >= config.repeat_probability)]
            if not len(redraw):
                break
            chosen[redraw] = _propose(step, redraw, users, catalogue, rng)
            # Only the redrawn users' candidates changed: the others keep their answer.
            repeat[redraw] = users.seen(step, chosen[redraw], redraw)
        users.items[:active, step] = chosen
        users.drift(active, rng)
    by_user = users.items if pad_to_longest else users.items[np.argsort(order)]
    return lengths, by_user[np.arange(config.max_length) < lengths[:, None]]


def _names(prefix: str, start: int, stop: int) -> list[str]:
    """External ids of generator ids start..stop-1: "u1", "u2", ... (ids count from 1)."""
    return [f"{prefix}{number}" for number in range(start + 1, stop + 1)]


DEFAULT_CONFIG = SyntheticConfig()


def generate(config: SyntheticConfig = DEFAULT_CONFIG) -> SequenceData:
    """The synthetic data set of `config`, deterministic in `config.seed`."""
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    catalogue = draw_catalogue(config, rng)
    lengths, flat = generate_users(config, catalogue, config.num_users, rng)
    user_names = np.array(_names("u", 0, config.num_users), dtype=object)
    item_names = np.array(_names("i", 0, config.num_items), dtype=object)
    interactions = Interactions(np.repeat(user_names, lengths), item_names[flat], None)
    data = build_sequences(interactions, source="synthetic", fmt="synthetic")
    data = dataclasses.replace(data, meta={**data.meta, "synthetic": config.model_dump()})
    logger.info(
        "generated synthetic data: %d users, %d items, %d interactions in %.2f s",
        data.num_users,
        data.num_items,
        data.num_interactions,
        time.perf_counter() - started,
    )
    return data
