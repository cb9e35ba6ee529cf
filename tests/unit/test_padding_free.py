"""Padding-free encoders (``padding_free: true``, d2v.nn.packing): on a padded batch the audio and
text encoders give the padded path's outputs, hidden states, layer targets and gradients at every
real position (fp32, 1e-5), zeros at the padding, for 1.0 and 2.0 (ALiBi) settings."""

import pytest
import torch

from d2v.api.errors import SpecError
from d2v.nn.packing import PackedBatch
from d2v_audio.encoder import AudioTransformerEncoder
from d2v_text.encoder import TextTransformerEncoder

SMALL = dict(dim=32, layers=2, heads=4, ffn_dim=64)
AUDIO = dict(num_pos_conv_layers=1, pos_conv_kernel=3, pos_conv_groups=4, mask_time_prob=0.0, layerdrop=0.0)
ENCODERS = {
    "audio": lambda **kw: AudioTransformerEncoder(**SMALL, **AUDIO, **kw),
    "audio_alibi": lambda **kw: AudioTransformerEncoder(**SMALL, **AUDIO, alibi=True, zero_padded_frames=False, **kw),
    "text": lambda **kw: TextTransformerEncoder(**SMALL, **kw),
}


#: on a GPU the packed attention is a nested jagged tensor through SDPA's variable-length kernels
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pair(name, device):
    torch.manual_seed(0)
    padded = ENCODERS[name]().eval()
    packed = ENCODERS[name](padding_free=True).eval()
    packed.load_state_dict(padded.state_dict())
    return padded.to(device), packed.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_padding_free_equals_the_padded_path_at_real_positions(name, device):
    padded, packed = _pair(name, device)
    lengths = torch.tensor([11, 7, 3])
    padding = (torch.arange(11)[None, :] >= lengths[:, None]).to(device)
    x = torch.randn(3, 11, 32).to(device)
    outputs = []
    for model in (padded, packed):
        inputs = x.clone().requires_grad_(True)
        out = model.contextualize(inputs, padding, output_hidden_states=True, output_layer_targets=True)
        real = ~padding
        (out.last_hidden_state[real].square().sum() + sum(t[real].sum() for t in out.layer_targets)).backward()
        outputs.append((out, inputs.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (reference, x_grad, grads), (result, packed_x_grad, packed_grads) = outputs
    real = ~padding
    torch.testing.assert_close(result.last_hidden_state[real], reference.last_hidden_state[real], atol=1e-5, rtol=0)
    assert not result.last_hidden_state[padding].any()
    for ours, theirs in zip(result.hidden_states + result.layer_targets, reference.hidden_states + reference.layer_targets):
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_x_grad[real], x_grad[real], atol=1e-5, rtol=0)
    assert grads.keys() == packed_grads.keys()
    for n in grads:
        torch.testing.assert_close(packed_grads[n], grads[n], atol=1e-5, rtol=1e-5, msg=n)


def test_a_batch_without_padding_is_not_repacked():
    assert PackedBatch.of(torch.zeros(2, 5, dtype=torch.bool)) is None and PackedBatch.of(None) is None
    packing = PackedBatch(torch.tensor([[False, False, True], [False, True, True]]))
    x = torch.arange(6.0).view(2, 3, 1)
    assert packing.pack(x).flatten().tolist() == [0.0, 1.0, 3.0]
    assert packing.unpack(packing.pack(x)).flatten().tolist() == [0.0, 1.0, 0.0, 3.0, 0.0, 0.0]


def test_decoders_refuse_padding_free():
    with pytest.raises(SpecError, match="padding_free is for encoders"):
        TextTransformerEncoder(**SMALL, is_decoder=True, padding_free=True)


@pytest.mark.parametrize("name", ["text", "audio_alibi"])
def test_padding_free_blocks_compiled_as_trainer_compile_does_give_the_padded_outputs(name):
    """``trainer.compile`` (each block compiled in place) on a padding-free encoder: two batches
    of other lengths and padding give the eager padded path's outputs at real positions."""
    from d2v.nn.layer_options import apply_layer_options

    padded, packed = _pair(name, "cpu")
    apply_layer_options(packed, compile={"backend": "aot_eager"})
    for lengths in ([11, 7, 3], [9, 9, 2]):
        lengths = torch.tensor(lengths)
        padding = torch.arange(int(lengths.max()))[None, :] >= lengths[:, None]
        x = torch.randn(3, int(lengths.max()), 32)
        ours, theirs = (m.contextualize(x, padding).last_hidden_state for m in (packed, padded))
        torch.testing.assert_close(ours[~padding], theirs[~padding], atol=1e-5, rtol=0)
