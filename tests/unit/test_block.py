"""d2v.nn.block.TransformerBlock, the one block every built-in encoder stacks: its math written
out by hand for post-LN and pre-LN (layer scale, no MLP residual), the fused and the separate
projections computing the same attention, and weight names and order following the layout."""

import pytest
import torch
import torch.nn.functional as F

from d2v.api.errors import SpecError
from d2v.nn.attention import AttentionNames
from d2v.nn.block import BlockNames, TransformerBlock

DIM, HEADS = 16, 4


def _attention_by_hand(attn, x, mask):
    q, k, v = (attn.projection(role)(x) for role in ("query", "key", "value"))
    split = lambda t: t.view(*t.shape[:2], HEADS, -1).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / (DIM // HEADS) ** 0.5
    scores = scores.masked_fill(~mask, float("-inf")) if mask is not None else scores
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)
    return attn.projection("output")(out)


def _ffn_by_hand(ffn, x):
    return ffn.fc2(F.gelu(ffn.fc1(x)))


def test_post_ln_block_is_the_speech_and_text_layer():
    torch.manual_seed(0)
    block = TransformerBlock(DIM, HEADS, 32).eval()
    x = torch.randn(2, 7, DIM)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., -2:] = False
    h = block.attention_norm(x + _attention_by_hand(block.attention, x, mask))
    ffn = _ffn_by_hand(block.ffn, h)
    y, target = block(x, mask)
    torch.testing.assert_close(target, ffn, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, block.ffn_norm(h + ffn), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mlp_residual", [True, False])
def test_pre_ln_block_with_layer_scale(mlp_residual):
    torch.manual_seed(0)
    names = BlockNames(attention_norm="norm1", ffn="mlp", ffn_norm="norm2",
                       order=("attention_norm", "attention", "ffn_norm", "ffn"))
    block = TransformerBlock(DIM, HEADS, 32, layer_norm_first=True, layer_scale_init=0.3, mlp_residual=mlp_residual,
                             names=names).eval()
    x = torch.randn(2, 5, DIM)
    h = x + block.lambda_1 * _attention_by_hand(block.attention, block.norm1(x), None)
    ffn = _ffn_by_hand(block.mlp, block.norm2(h))
    y, target = block(x)
    torch.testing.assert_close(target, ffn, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, (h if mlp_residual else ffn) + block.lambda_2 * ffn, atol=1e-6, rtol=0)


def test_fused_and_separate_projections_compute_the_same_attention():
    torch.manual_seed(0)
    separate = TransformerBlock(DIM, HEADS, 32).eval()
    fused = TransformerBlock(DIM, HEADS, 32, names=BlockNames(projections=AttentionNames(fused="qkv"))).eval()
    state = dict(separate.state_dict())
    parts = [state.pop(f"attention.{p}_proj.weight") for p in "qkv"], [state.pop(f"attention.{p}_proj.bias") for p in "qkv"]
    state["attention.qkv.weight"], state["attention.qkv.bias"] = torch.cat(parts[0]), torch.cat(parts[1])
    fused.load_state_dict(state)
    x = torch.randn(3, 9, DIM)
    torch.testing.assert_close(fused(x)[0], separate(x)[0], atol=1e-6, rtol=0)


def test_weight_names_and_order_follow_the_layout():
    beit = BlockNames(attention_norm="norm1", ffn="mlp", ffn_norm="norm2",
                      projections=AttentionNames(query="query", key="key", value="value", output="proj", key_bias=False),
                      order=("attention_norm", "attention", "ffn_norm", "ffn"))
    names = list(TransformerBlock(DIM, HEADS, 32, layer_scale_init=0.1, names=beit).state_dict())
    assert names == ["lambda_1", "lambda_2", "norm1.weight", "norm1.bias", "attention.query.weight",
                     "attention.query.bias", "attention.key.weight", "attention.value.weight", "attention.value.bias",
                     "attention.proj.weight", "attention.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                     "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    with pytest.raises(ValueError, match="leaves out"):
        TransformerBlock(DIM, HEADS, 32, names=BlockNames(order=("attention", "ffn")))
    with pytest.raises(SpecError, match="only for pre-LN"):
        TransformerBlock(DIM, HEADS, 32, mlp_residual=False)


def test_a_bool_key_mask_and_a_position_bias_add_up_as_logits():
    class FixedBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(1, HEADS, 6, 6))

        def forward(self):
            return self.table

    torch.manual_seed(0)
    block = TransformerBlock(DIM, HEADS, 32, position_bias=FixedBias()).eval()
    x = torch.randn(2, 6, DIM)
    allowed = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    allowed[1, ..., -2:] = False
    logits = torch.zeros(2, 1, 1, 6).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(block(x, allowed)[0], block(x, logits)[0], atol=1e-6, rtol=0)
