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
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.data import Interactions, SequenceData, build_sequences

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
        index = np.minimum(
            np.searchsorted(self.topic_cdf, keys, side="right"), len(self.by_topic) - 1
        )
        return self.by_topic[index]

    def popular(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.searchsorted(self.global_cdf, rng.random(n), side="right")

    def successor(self, last: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        choice = np.searchsorted(self.successor_cdf, rng.random(len(last)), side="right")
        return self.successors[last, choice]


def _catalogue(config: SyntheticConfig, rng: np.random.Generator) -> _Catalogue:
    num_items, num_topics = config.num_items, config.num_topics
    # Balanced topics (every topic non-empty), shuffled so topic and id are unrelated.
    topic_of = rng.permutation(np.arange(num_items) % num_topics)
    weight = 1.0 / (rng.permutation(num_items) + 1.0) ** config.zipf_exponent
    by_topic = np.lexsort((np.arange(num_items), topic_of))
    topic_cdf = np.empty(num_items)
    for topic in range(num_topics):
        members = np.flatnonzero(topic_of[by_topic] == topic)
        share = np.cumsum(weight[by_topic[members]])
        topic_cdf[members] = topic + share / share[-1]
        topic_cdf[members[-1]] = topic + 1.0  # exact end, whatever the rounding
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


def _lengths(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Right-skewed lengths (gamma, shape 2) with the configured mean, clipped to the range."""
    extra = config.mean_length - config.min_length
    drawn = config.min_length + rng.gamma(2.0, extra / 2.0, size=config.num_users)
    return np.clip(np.rint(drawn), config.min_length, config.max_length).astype(np.int64)


class _Users:
    """Every user's state while generating: preferences, items so far, what was seen."""

    def __init__(self, config: SyntheticConfig, rng: np.random.Generator) -> None:
        self.config = config
        alpha = np.full(config.num_topics, config.user_concentration)
        self.preference = rng.dirichlet(alpha, size=config.num_users)  # (U, T)
        self.items = np.zeros((config.num_users, config.max_length), dtype=np.int64)  # (U, L)
        self.seen = np.zeros((config.num_users, config.num_items), dtype=bool)  # (U, I)

    def preferred_topics(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cdf = np.cumsum(self.preference[rows], axis=1)  # (B, T)
        draws = rng.random(len(rows))[:, None] * cdf[:, -1:]
        return np.minimum((cdf <= draws).sum(axis=1), self.config.num_topics - 1)

    def drift(self, rng: np.random.Generator) -> None:
        config = self.config
        moving = np.flatnonzero(rng.random(config.num_users) < config.drift_rate)
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


def _generate_items(config: SyntheticConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Item sequences (0-based generator ids), one per user."""
    catalogue = _catalogue(config, rng)
    lengths = _lengths(config, rng)
    users = _Users(config, rng)
    everyone = np.arange(config.num_users)
    for step in range(int(lengths.max())):
        chosen = _propose(step, everyone, users, catalogue, rng)
        for _ in range(config.max_redraws):
            repeat = users.seen[everyone, chosen]
            redraw = everyone[repeat & (rng.random(config.num_users) >= config.repeat_probability)]
            if not len(redraw):
                break
            chosen[redraw] = _propose(step, redraw, users, catalogue, rng)
        users.items[:, step] = chosen
        users.seen[everyone, chosen] = True
        users.drift(rng)
    return [users.items[row, :length] for row, length in enumerate(lengths)]


DEFAULT_CONFIG = SyntheticConfig()


def generate(config: SyntheticConfig = DEFAULT_CONFIG) -> SequenceData:
    """The synthetic data set of `config`, deterministic in `config.seed`."""
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    sequences = _generate_items(config, rng)
    lengths = [len(seq) for seq in sequences]
    user_names = np.array([f"u{row + 1}" for row in range(config.num_users)], dtype=object)
    item_names = np.array([f"i{item + 1}" for item in range(config.num_items)], dtype=object)
    flat = np.concatenate(sequences)
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
