"""The backbone: padding invariance, attention masks, truncation, checkpoints."""

from __future__ import annotations

import pytest
import torch

from training.checkpoint import CheckpointError, load_checkpoint, write_checkpoint
from training.model import ModelConfig, build_model

BACKBONES = ["bert4rec", "sasrec"]


def tiny(backbone: str, **kw) -> torch.nn.Module:
    settings = dict(hidden_size=16, num_layers=2, num_heads=2, max_len=8) | kw
    config = ModelConfig(num_items=40, backbone=backbone, **settings)
    return build_model(config, seed=0).eval()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_left_padding_does_not_change_prediction(backbone: str) -> None:
    model = tiny(backbone)
    history = torch.tensor([[5, 9, 3]])
    padded = torch.tensor([[0, 0, 0, 5, 9, 3]])
    assert torch.allclose(model.logits(history), model.logits(padded), atol=1e-6)
    # ... also when the padding comes from a longer neighbour in the same batch
    batch = torch.tensor([[0, 0, 5, 9, 3], [1, 2, 3, 4, 5]])
    assert torch.allclose(model.logits(history)[0], model.logits(batch)[0], atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("num_layers", [1, 3])
def test_inference_state_equals_the_training_path(backbone: str, num_layers: int) -> None:
    """hidden() runs the last block for the prediction position only; same state as encode()."""
    model = tiny(backbone, num_layers=num_layers)
    batch = torch.tensor([[0, 0, 5, 9, 3], [1, 2, 3, 4, 5], [0, 0, 0, 0, 7]])
    full = model.encode(model.prediction_input(batch))[:, -1]
    assert model.hidden(batch).shape == full.shape
    torch.testing.assert_close(model.hidden(batch), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_padding_embedding_is_never_seen(backbone: str) -> None:
    model = tiny(backbone)
    padded = torch.tensor([[0, 0, 5, 9, 3]])
    before = model.logits(padded)
    with torch.no_grad():
        model.item_embedding.weight[0].normal_()
    assert torch.allclose(before, model.logits(padded), atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_empty_history_gives_finite_scores(backbone: str) -> None:
    model = tiny(backbone)
    scores = model.logits(torch.zeros(3, 4, dtype=torch.long))
    assert scores.shape == (3, 40)
    assert torch.isfinite(scores).all()


def test_sasrec_is_causal_and_bert4rec_is_not() -> None:
    items = torch.tensor([[4, 7, 1, 9, 2]])
    changed = items.clone()
    changed[0, -1] = 30
    sasrec, bert = tiny("sasrec"), tiny("bert4rec")
    # A SASRec state never depends on later items; a BERT4Rec state does.
    assert torch.allclose(sasrec.encode(items)[:, :-1], sasrec.encode(changed)[:, :-1], atol=1e-6)
    assert not torch.allclose(bert.encode(items)[:, :-1], bert.encode(changed)[:, :-1], atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_long_history_keeps_the_newest_items(backbone: str) -> None:
    model = tiny(backbone)
    long = torch.arange(1, 21)[None, :]  # 20 items, max_len 8
    keep = model.config.max_len - (0 if backbone == "sasrec" else 1)
    assert torch.allclose(model.logits(long), model.logits(long[:, -keep:]), atol=1e-6)
    other_start = long.clone()
    other_start[0, 0] = 33
    assert torch.allclose(model.logits(long), model.logits(other_start), atol=1e-6)


def test_bert4rec_prediction_reads_the_mask_position() -> None:
    model = tiny("bert4rec")
    history = torch.tensor([[5, 9, 3]])
    manual = model.encode(torch.tensor([[5, 9, 3, model.config.mask_id]]))[:, -1]
    assert torch.allclose(model.hidden(history), manual)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(num_items=10, hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="backbone"):
        ModelConfig(num_items=10, backbone="gru4rec")  # type: ignore[arg-type]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_checkpoint_round_trip_is_bit_identical(tmp_path, backbone: str) -> None:
    model = tiny(backbone)
    write_checkpoint(tmp_path / "ckpt", model, model.config, {"note": "x"})
    loaded = load_checkpoint(tmp_path / "ckpt")
    history = torch.tensor([[0, 3, 4, 5], [1, 2, 3, 4]])
    assert torch.equal(model.logits(history), loaded.model.logits(history))
    assert loaded.info == {"note": "x"}
    assert loaded.config == model.config


def test_corrupt_checkpoint_is_refused(tmp_path) -> None:
    model = tiny("bert4rec")
    write_checkpoint(tmp_path / "ckpt", model, model.config)
    weights = tmp_path / "ckpt" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "nothing")


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"embedding_input": "layernorm", "prediction_head": True, "activation": "gelu"},
        {"block": "prenorm", "attention_init": "normal"},
        {"positions": "end"},
    ],
    ids=["sasrec-style", "bert4rec-style", "prenorm-block", "positions-from-end"],
)
def test_architecture_variants_keep_padding_invariance(backbone: str, variant: dict) -> None:
    model = tiny(backbone, **variant)
    assert (model.embed_norm is None) == (model.config.embedding_input == "scaled")
    assert isinstance(model.head, torch.nn.Identity) != model.config.prediction_head
    history = torch.tensor([[5, 9, 3]])
    padded = torch.tensor([[0, 0, 0, 5, 9, 3]])
    assert torch.allclose(model.logits(history), model.logits(padded), atol=1e-6)


def test_scaled_input_multiplies_item_vectors_by_sqrt_width() -> None:
    model = tiny("sasrec", num_layers=1)
    captured = {}
    model.embed_dropout.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    items = torch.tensor([[3, 4]])
    model.encode(items)
    positions = model.position_embedding.weight[:2]  # counted from the oldest item
    expected = model.item_embedding(items) * 16**0.5 + positions
    torch.testing.assert_close(captured["x"], expected)


def test_checkpoints_without_the_new_fields_load_as_the_old_architecture(tmp_path) -> None:
    # checkpoint.json written before embedding_input/prediction_head/activation existed
    old = {"num_items": 40, "backbone": "sasrec", "hidden_size": 16, "num_heads": 2, "max_len": 8}
    config = ModelConfig.from_dict(old)
    assert config.embedding_input == "layernorm" and config.prediction_head
    assert config.activation == "gelu"
    assert config.block == "prenorm" and config.attention_init == "normal"
    assert config.positions == "end"
    model = build_model(config, seed=0)
    write_checkpoint(tmp_path / "c", model, config, {})
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.config == config
    assert set(loaded.model.state_dict()) == set(model.state_dict())


def test_sasrec_block_reads_keys_from_the_unnormalised_stream() -> None:
    """SASRec's wiring: queries from LN(x), keys/values from x; the pre-norm block differs."""
    sasrec = tiny("sasrec", num_layers=1, block="sasrec")
    prenorm = tiny("sasrec", num_layers=1, block="prenorm")
    prenorm.load_state_dict(sasrec.state_dict())  # same weights, other wiring
    history = torch.tensor([[5, 9, 3, 7]])
    assert not torch.allclose(sasrec.logits(history), prenorm.logits(history), atol=1e-4)
    block, x = sasrec.blocks[0], torch.randn(1, 4, 16)
    allowed = sasrec.attention_mask(history)
    normed = block.ln_attn(x)
    # Scaling x changes keys and values but not LN(x): the output must change.
    assert not torch.allclose(block(x, allowed), block(3 * x, allowed), atol=1e-4)
    assert torch.allclose(block.ln_attn(3 * x), normed, atol=1e-4)


def test_xavier_attention_init_widens_only_the_attention_projection() -> None:
    xavier = tiny("sasrec", attention_init="xavier")
    normal = tiny("sasrec", attention_init="normal")
    qkv = xavier.blocks[0].attn.qkv.weight
    bound = (6 / (qkv.shape[0] + qkv.shape[1])) ** 0.5
    assert qkv.abs().max() <= bound and qkv.std() > 3 * normal.blocks[0].attn.qkv.weight.std()
    torch.testing.assert_close(
        xavier.blocks[0].ffn.fc_in.weight.std(), torch.tensor(0.02), atol=0.005, rtol=0
    )


def test_positions_count_from_the_chosen_end_of_the_window() -> None:
    items = torch.tensor([[0, 0, 5, 9, 3], [4, 8, 2, 6, 1]])
    start = tiny("sasrec", positions="start").positions(items)
    assert start.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    max_len = tiny("sasrec").config.max_len
    end = tiny("sasrec", positions="end").positions(items)
    assert end.tolist() == list(range(max_len - 5, max_len))
