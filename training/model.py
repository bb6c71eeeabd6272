"""The sequential recommendation backbone: BERT4Rec and SASRec in one file.

BERT4Rec (Sun et al., CIKM 2019) and SASRec (Kang & McAuley, ICDM 2018) share
everything but the attention pattern: BERT4Rec attends in both directions and
predicts masked positions (Cloze), SASRec attends causally and predicts the next
item at every position. Both score items with the shared item embedding:

    z = W h + b        W = item embedding rows of the real items, b = output bias

Items are represented by one table (`item_representations`), read by both the
input and the output layer. By default it is the ID embedding. Optionally (off
by default, and then nothing of it exists in the model) it adds a text part:
frozen item features (a buffer, saved with the weights and exported as a
constant) mapped by the adaptor of training/modality.py, either on top of the
ID embedding ("id+text") or alone ("text", which scores any catalogue whose
items have text, including one the model never saw).

Read top to bottom: config, attention, feed-forward, block, the model.

Conventions used everywhere in fishrec:
- item ids are internal: 0 is padding, 1..num_items are items, num_items + 1 is
  [MASK]; sequences are oldest first and LEFT-padded with 0;
- column j of `logits` scores item id j + 1 (padding and [MASK] are never scored);
- positions are counted from the right end of the sequence, so left padding
  never changes what a real item sees: a padded and an unpadded history give the
  same prediction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.modality import WhiteningMixture

Backbone = Literal["bert4rec", "sasrec"]
ItemRepresentation = Literal["id", "id+text", "text"]
# How item and position embeddings enter the first block: "scaled" is SASRec's
# sqrt(D) * item + position; "layernorm" is BERT4Rec's LayerNorm(item + position).
EmbeddingInput = Literal["scaled", "layernorm"]
Activation = Literal["relu", "gelu"]
# The block's wiring. "prenorm": x + attn(LN(x)), then x + ffn(LN(x)) (GPT-2, BERT4Rec
# re-implementations). "sasrec": Kang & McAuley's own code, which SASRec+ trains:
# queries and the residual come from LN(x) while keys and values read x itself, and
# the feed-forward residual starts after its norm, so the stream is re-normalised by
# every block.
BlockStyle = Literal["prenorm", "sasrec"]
# "normal": every weight N(0, init_std). "xavier": the query/key/value projection
# gets Xavier-uniform instead (std ~0.09 at D = 64, what torch's MultiheadAttention
# gives SASRec's code), so attention is not uniform at the first step.
AttentionInit = Literal["normal", "xavier"]
# Which end of the input window position 0 is. "end": the newest item always has
# position max_len - 1, so positions say how recent an item is. "start": the oldest
# item of the window has position 0 (SASRec's and SASRec+'s right padding does this),
# so positions also say how long the user's history is when it fits in the window.
Positions = Literal["end", "start"]
PAD_ID = 0
# Config fields that exist only with modality; a plain config is written without them.
MODALITY_FIELDS = ("item_representation", "feature_dim", "adaptor_experts")
# Checkpoints written before these fields existed had this architecture; loading
# one fills them in, so old checkpoints keep loading as what they are.
LEGACY_ARCHITECTURE = {
    "embedding_input": "layernorm",
    "prediction_head": True,
    "activation": "gelu",
    "block": "prenorm",
    "attention_init": "normal",
    "positions": "end",
}


@dataclass(frozen=True)
class ModelConfig:
    num_items: int
    backbone: Backbone = "bert4rec"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 1
    max_len: int = 50  # longest input, [MASK] included for bert4rec
    dropout: float = 0.1  # on embeddings and residual branches
    attn_dropout: float = 0.1  # on attention probabilities
    ffn_mult: int = 1  # feed-forward width = ffn_mult * hidden_size
    init_std: float = 0.02
    embedding_input: EmbeddingInput = "scaled"  # see EmbeddingInput
    prediction_head: bool = False  # BERT4Rec's Linear-GELU-LayerNorm before the output layer
    activation: Activation = "relu"  # of the feed-forward layer
    block: BlockStyle = "sasrec"  # see BlockStyle
    attention_init: AttentionInit = "xavier"  # see AttentionInit
    positions: Positions = "start"  # see Positions
    item_representation: ItemRepresentation = "id"  # id, id+text or text (see the header)
    feature_dim: int = 0  # width F of the item features; 0 with "id"
    adaptor_experts: int = 4  # whitening experts of the modality adaptor

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.backbone not in ("bert4rec", "sasrec"):
            raise ValueError(f"backbone must be 'bert4rec' or 'sasrec', got {self.backbone!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if self.embedding_input not in ("scaled", "layernorm"):
            raise ValueError(
                f"embedding_input must be 'scaled' or 'layernorm', got {self.embedding_input!r}"
            )
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")
        if self.block not in ("prenorm", "sasrec"):
            raise ValueError(f"block must be 'prenorm' or 'sasrec', got {self.block!r}")
        if self.attention_init not in ("normal", "xavier"):
            raise ValueError(
                f"attention_init must be 'normal' or 'xavier', got {self.attention_init!r}"
            )
        if self.positions not in ("end", "start"):
            raise ValueError(f"positions must be 'end' or 'start', got {self.positions!r}")
        if self.item_representation not in ("id", "id+text", "text"):
            raise ValueError(
                f"item_representation must be 'id', 'id+text' or 'text', got {self.item_representation!r}"
            )
        if self.modality and (self.feature_dim < 1 or self.adaptor_experts < 1):
            raise ValueError(
                f"item_representation {self.item_representation!r} needs feature_dim >= 1 (the "
                f"width of the item features) and adaptor_experts >= 1, got {self.feature_dim} "
                f"and {self.adaptor_experts}"
            )
        if not self.modality and self.feature_dim:
            raise ValueError("feature_dim is for item_representation 'id+text' or 'text'")

    @property
    def mask_id(self) -> int:
        return self.num_items + 1

    @property
    def causal(self) -> bool:
        return self.backbone == "sasrec"

    @property
    def modality(self) -> bool:
        """Whether items have a text part (features + adaptor)."""
        return self.item_representation != "id"

    @property
    def uses_ids(self) -> bool:
        """Whether items have an ID embedding (not so for text-only models)."""
        return self.item_representation != "text"

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if not self.modality:
            # Written exactly as before modality existed: plain checkpoint.json stays the same.
            for name in MODALITY_FIELDS:
                del values[name]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return cls(**{**LEGACY_ARCHITECTURE, **values})


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = config.attn_dropout

    def forward(
        self, x: Tensor, allowed: Tensor, queries: int | None = None, context: Tensor | None = None
    ) -> Tensor:
        # x: (B, L, D); allowed: (B, 1, Q, L) bool, True where a query may attend a key.
        # queries: only the last Q positions ask (all L by default); every position is a key.
        # context: what keys and values are computed from (x itself by default).
        batch, _, dim = x.shape
        if context is None:
            q, k, v = self.qkv(x).split(dim, dim=-1)
        else:
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, weight[:dim], bias[:dim])
            k, v = F.linear(context, weight[dim:], bias[dim:]).split(dim, dim=-1)
        if queries is not None:
            q = q[:, -queries:]
        # (B, L, D) -> (B, nh, L, hs)
        q, k, v = (t.reshape(batch, -1, self.num_heads, dim // self.num_heads) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(batch, -1, dim)  # (B, Q, D)
        return self.proj(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.ffn_mult * config.hidden_size)
        self.fc_out = nn.Linear(config.ffn_mult * config.hidden_size, config.hidden_size)
        self.activation = F.relu if config.activation == "relu" else F.gelu
        # SASRec's block also drops units of the hidden layer; the pre-norm block does not.
        self.inner_dropout = nn.Dropout(config.dropout if config.block == "sasrec" else 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.activation(self.inner_dropout(self.fc_in(x))))


class Block(nn.Module):
    """A transformer block wired as `config.block` says (see BlockStyle)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.style = config.block
        self.ln_attn = nn.LayerNorm(config.hidden_size)
        self.attn = SelfAttention(config)
        self.ln_ffn = nn.LayerNorm(config.hidden_size)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, allowed: Tensor, queries: int | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D), or the last `queries` positions only, (B, Q, D)."""
        last = slice(None)  # the positions that come out
        if queries is not None:
            allowed, last = allowed[:, :, -queries:], slice(-queries, None)
        normed = self.ln_attn(x)
        if self.style == "sasrec":
            # Queries and residual from LN(x), keys and values from x; SASRec drops
            # attention weights only, not the attention output.
            x = normed[:, last] + self.attn(normed, allowed, queries, context=x)
            normed = self.ln_ffn(x)
            return normed + self.dropout(self.ffn(normed))
        attended = self.attn(normed, allowed, queries)
        x = x[:, last] + self.dropout(attended)
        return x + self.dropout(self.ffn(self.ln_ffn(x)))


class SequenceRecommender(nn.Module):
    """BERT4Rec / SASRec backbone with a tied output layer and an output bias.

    Training path: `encode(item_ids)` gives a state at every position, `score`
    turns states into logits. Inference path: `hidden(history)` gives the state
    at the prediction position, `logits(history)` the scores of every item.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        if config.uses_ids:
            self.item_embedding = nn.Embedding(config.num_items + 2, d, padding_idx=PAD_ID)
        self.position_embedding = nn.Embedding(config.max_len, d)
        # SASRec scales the item vectors instead: with std 0.02 rows, sqrt(D) * item
        # (std ~0.16) is not drowned by positions, and no norm re-centres every input.
        self.embed_norm = nn.LayerNorm(d) if config.embedding_input == "layernorm" else None
        self.input_scale = d**0.5 if config.embedding_input == "scaled" else 1.0
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(d)
        # BERT4Rec's prediction head: a non-linear transform before the tied output layer.
        self.head = (
            nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
            if config.prediction_head
            else nn.Identity()
        )
        self.output_bias = nn.Parameter(torch.zeros(config.num_items))
        if config.modality:
            self._add_modality(config)
        self.apply(self._init_weights)
        if config.attention_init == "xavier":
            for block in self.blocks:
                nn.init.xavier_uniform_(block.attn.qkv.weight)

    def _add_modality(self, config: ModelConfig) -> None:
        """The text part: frozen features and mask as buffers, the adaptor as parameters."""
        d = config.hidden_size
        self.item_adaptor = WhiteningMixture(
            config.feature_dim, d, config.adaptor_experts, config.dropout, config.init_std
        )
        # Zeros until `set_item_features` (or a checkpoint) fills them.
        self.register_buffer("item_features", torch.zeros(config.num_items, config.feature_dim))
        self.register_buffer("feature_mask", torch.zeros(config.num_items))
        if not config.uses_ids:
            # Text-only models have no ID table, but [MASK] still needs a learned vector.
            self.mask_embedding = nn.Parameter(torch.randn(1, d) * config.init_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def set_item_features(self, features: Tensor, mask: Tensor) -> None:
        """Load the item features (N, F) and their mask (N,) (1: the item has text)."""
        if not self.config.modality:
            raise ValueError("this model has no text part (item_representation 'id')")
        if features.shape != self.item_features.shape or mask.shape != self.feature_mask.shape:
            raise ValueError(
                f"features {tuple(features.shape)} / mask {tuple(mask.shape)} do not fit the "
                f"model's {tuple(self.item_features.shape)} / {tuple(self.feature_mask.shape)}"
            )
        with torch.no_grad():
            self.item_features.copy_(features)
            self.feature_mask.copy_(mask)

    # ---- items ---------------------------------------------------------------------

    def item_representations(self) -> Tensor:
        """The vector of every id, (N + 2, D): 0 padding, 1..N the items, N + 1 [MASK].

        The one place items are represented: the input (`embed`) and the output
        layer (`output_weight`) both read it. Plain: the ID embedding table.
        With modality: ID embedding + adaptor(features) ("id+text") or the
        adaptor alone ("text"); an item without text gets no text part.
        """
        if not self.config.modality:
            return self.item_embedding.weight
        text = self.item_adaptor(self.item_features) * self.feature_mask[:, None]  # (N, D)
        none = text.new_zeros(1, text.shape[1])
        if self.config.uses_ids:
            return self.item_embedding.weight + torch.cat([none, text, none])
        return torch.cat([none, text, self.mask_embedding])

    def embed(self, item_ids: Tensor) -> Tensor:
        """Input vectors of ids: (B, L) -> (B, L, D), rows of `item_representations()`."""
        if not self.config.modality:
            # Through the module, not its table: merging/fisher_exact.py hooks this call.
            return self.item_embedding(item_ids)
        return F.embedding(item_ids, self.item_representations(), padding_idx=PAD_ID)

    def item_rows(self, item_ids: Tensor) -> Tensor:
        """Rows of `item_representations()` for some ids, (..., D): what a sampled softmax reads.

        Plain models gather from the table itself, so a sparse table (the
        trainer's `sparse_items`) gets a gradient over these rows only.
        """
        if not self.config.modality:
            table = self.item_embedding
            return F.embedding(item_ids, table.weight, padding_idx=PAD_ID, sparse=table.sparse)
        return self.item_representations()[item_ids]

    def output_weight(self) -> Tensor:
        """W: the representations of the real items, (N, D); shared with the input."""
        return self.item_representations()[1 : self.config.num_items + 1]

    # ---- training path -------------------------------------------------------------

    def attention_mask(self, item_ids: Tensor) -> Tensor:
        """(B, 1, L, L) bool: keys that are real items (and, for SASRec, not in the future).

        Every position may always attend to itself, so a padding position (or a
        fully padded row) has a finite output instead of a NaN from an empty softmax.
        """
        length = item_ids.shape[1]
        allowed = (item_ids != PAD_ID)[:, None, None, :]  # (B, 1, 1, L)
        if self.config.causal:
            causal = torch.ones(length, length, dtype=torch.bool, device=item_ids.device).tril()
            allowed = allowed & causal  # (B, 1, L, L)
        eye = torch.eye(length, dtype=torch.bool, device=item_ids.device)
        return allowed | eye

    def positions(self, item_ids: Tensor) -> Tensor:
        """Position ids of (B, L) left-padded inputs, counted as `config.positions` says.

        Both ways depend on the real items only, so padding never changes them.
        """
        length = item_ids.shape[1]
        if self.config.positions == "end":
            # The newest item always gets position max_len - 1: (L,), broadcast over B.
            return torch.arange(length, device=item_ids.device) + (self.config.max_len - length)
        # The oldest real item gets 0; padding (left of it) gets 0 too and is masked anyway.
        return ((item_ids != PAD_ID).cumsum(dim=1) - 1).clamp(min=0)  # (B, L)

    def encode(self, item_ids: Tensor, last_only: bool = False) -> Tensor:
        """States at every position: (B, L) ids -> (B, L, D), after the prediction head.

        `last_only`: the state of the last position alone, (B, 1, D). The last block
        then computes one query per sequence instead of L (the other positions' outputs
        would be thrown away): about a third less work for inference with 2 blocks.
        """
        x = self.embed(item_ids) * self.input_scale + self.position_embedding(
            self.positions(item_ids)
        )
        if self.embed_norm is not None:
            x = self.embed_norm(x)  # (B, L, D)
        x = self.embed_dropout(x)
        allowed = self.attention_mask(item_ids)
        for i, block in enumerate(self.blocks):
            last_block = i == len(self.blocks) - 1
            x = block(x, allowed, queries=1 if last_only and last_block else None)
        return self.head(self.final_norm(x))

    def score(self, states: Tensor) -> Tensor:
        """Logits z = W h + b for states (..., D) -> (..., N); column j is item j + 1."""
        return states @ self.output_weight().T + self.output_bias

    # ---- inference path ------------------------------------------------------------

    def prediction_input(self, history: Tensor) -> Tensor:
        """The model input that predicts the item after `history` (B, L), left-padded.

        BERT4Rec appends [MASK] after the last max_len - 1 items; SASRec reads the
        state of the newest of the last max_len items.
        """
        if not self.config.causal:
            history = history[:, -(self.config.max_len - 1) :]
            mask = torch.full_like(history[:, :1], self.config.mask_id)
            return torch.cat([history, mask], dim=1)
        return history[:, -self.config.max_len :]

    def hidden(self, history: Tensor) -> Tensor:
        """State at the prediction position: (B, L) -> (B, D)."""
        return self.encode(self.prediction_input(history), last_only=True)[:, -1]

    def logits(self, history: Tensor) -> Tensor:
        """Next-item logits over all items: (B, L) -> (B, N)."""
        return self.score(self.hidden(history))

    def forward(self, history: Tensor) -> Tensor:
        return self.logits(history)


class HiddenState(nn.Module):
    """`model.hidden` as a module's forward: (B, L) histories -> (B, D) states.

    What the exact Fisher differentiates (merging/fisher_exact.py, via
    functional_call) and what a bundle's user encoder exports
    (merging/retrieval_export.py): the inference path up to the output layer.
    """

    def __init__(self, model: SequenceRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, history: Tensor) -> Tensor:
        return self.model.hidden(history)


def build_model(config: ModelConfig, seed: int | None = None) -> SequenceRecommender:
    """A freshly initialised model; `seed` makes the initialisation reproducible."""
    if seed is None:
        return SequenceRecommender(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SequenceRecommender(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
