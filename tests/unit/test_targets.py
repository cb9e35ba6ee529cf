"""The data2vec target (plugins/d2v_targets/data2vec.py) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from d2v.api.errors import SpecError
from d2v.api.interfaces import EncoderOutput
from d2v_targets.data2vec import Data2VecTarget, channel_std, instance_norm, layer_norm

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def teacher(layers, padding_mask=None):
    layers = tuple(layers)
    return EncoderOutput(last_hidden_state=layers[-1], layer_targets=layers, padding_mask=padding_mask)


# ------------------------------------------------------------------ normalisation


def test_instance_norm_by_hand():
    # one utterance, 3 frames, 1 channel: [1, 2, 3] -> mean 2, biased var 2/3
    x = torch.tensor([[[1.0], [2.0], [3.0]]])
    out = instance_norm(x, eps=0.0)
    expected = torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3)
    assert torch.allclose(out[0, :, 0], expected, atol=1e-6)


def test_instance_norm_ignores_padding_and_zeros_it():
    # row 0: frames [1, 2, 3] valid, frame 3 = 100 is padding; channel 1: [2, 2, 5]
    x = torch.tensor([[[1.0, 2.0], [2.0, 2.0], [3.0, 5.0], [100.0, -50.0]]])
    pad = torch.tensor([[False, False, False, True]])
    out = instance_norm(x, pad, eps=1e-5)
    c0 = (torch.tensor([1.0, 2.0, 3.0]) - 2.0) / math.sqrt(2 / 3 + 1e-5)
    c1 = (torch.tensor([2.0, 2.0, 5.0]) - 3.0) / math.sqrt(2.0 + 1e-5)  # var = (1+1+4)/3
    assert torch.allclose(out[0, :3, 0], c0, atol=1e-5)
    assert torch.allclose(out[0, :3, 1], c1, atol=1e-5)
    assert torch.equal(out[0, 3], torch.zeros(2))


def test_instance_norm_padded_batch_matches_unpadded_rows():
    torch.manual_seed(0)
    a, b = torch.randn(1, 7, 3), torch.randn(1, 4, 3)
    batch = torch.zeros(2, 7, 3)
    batch[0], batch[1, :4] = a[0], b[0]
    batch[1, 4:] = 1e3  # garbage in the padding must not leak into the statistics
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    out = instance_norm(batch, pad)
    ref = lambda t: F.instance_norm(t.transpose(1, 2)).transpose(1, 2)  # noqa: E731
    assert torch.allclose(out[0:1], ref(a), atol=1e-5)
    assert torch.allclose(out[1:2, :4], ref(b), atol=1e-5)
    # no padding: equals torch's instance norm exactly
    assert torch.allclose(instance_norm(a), ref(a), atol=1e-6)


def test_layer_norm_by_hand():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(1.25 + 1e-5)
    assert torch.allclose(layer_norm(x)[0, 0], expected, atol=1e-6)


# ------------------------------------------------------------------ targets


def test_top_k_average_without_norm():
    layers = [torch.full((1, 2, 3), float(i)) for i in range(5)]  # layer i is all i
    target = Data2VecTarget(top_k=3, layer_norm=None)
    y = target.build(teacher(layers))
    assert torch.allclose(y, torch.full((1, 2, 3), 3.0))  # mean of 2, 3, 4
    assert Data2VecTarget(top_k=1, layer_norm=None).build(teacher(layers)).eq(4.0).all()


def test_top_k_instance_norm_then_average_by_hand():
    # two layers, one channel, 3 frames; layer_a = [1,2,3], layer_b = [0,0,6]
    la = torch.tensor([[[1.0], [2.0], [3.0]]])
    lb = torch.tensor([[[0.0], [0.0], [6.0]]])
    ignored = torch.randn(1, 3, 1)
    y = Data2VecTarget(top_k=2, layer_norm="instance", eps=0.0).build(teacher([ignored, la, lb]))
    na = torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3)
    nb = (torch.tensor([0.0, 0.0, 6.0]) - 2.0) / math.sqrt(8.0)  # var = (4+4+16)/3
    assert torch.allclose(y[0, :, 0], (na + nb) / 2, atol=1e-6)


def test_layer_norm_per_layer_and_final_norm():
    torch.manual_seed(1)
    layers = [torch.randn(2, 5, 8) * (i + 1) + i for i in range(4)]
    t = Data2VecTarget(top_k=2, layer_norm="layer", final_norm="layer")
    y = t.build(teacher(layers))
    manual = (F.layer_norm(layers[2], (8,)) + F.layer_norm(layers[3], (8,))) / 2
    manual = F.layer_norm(manual, (8,))
    assert torch.allclose(y, manual, atol=1e-5)
    # final instance norm respects padding too
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    y2 = Data2VecTarget(top_k=2, layer_norm=None, final_norm="instance").build(teacher(layers, pad))
    avg = (layers[2] + layers[3]) / 2
    assert torch.allclose(y2[1, :3], instance_norm(avg[1:2, :3])[0], atol=1e-5)


def test_targets_only_at_masked_positions():
    layer = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    mask = torch.tensor([[False, True, False, True], [True, False, False, False]])
    y = Data2VecTarget(top_k=1, layer_norm=None)(teacher([layer]), mask)
    assert y.shape == (3, 3)
    assert torch.equal(y, torch.stack([layer[0, 1], layer[0, 3], layer[1, 0]]))


def test_skip_tokens_drops_cls_position():
    layer = torch.arange(1 * 3 * 2, dtype=torch.float).view(1, 3, 2)
    y = Data2VecTarget(top_k=1, layer_norm=None).build(teacher([layer]), skip_tokens=1)
    assert torch.equal(y, layer[:, 1:])


def test_bad_parameters_and_too_few_layers():
    with pytest.raises(SpecError, match="layer_norm"):
        Data2VecTarget(layer_norm="batch")
    with pytest.raises(SpecError, match="loss"):
        Data2VecTarget(loss="l1")
    with pytest.raises(SpecError, match="top_k=8"):
        Data2VecTarget(top_k=8).build(teacher([torch.zeros(1, 2, 2)] * 2))


# ------------------------------------------------------------------ loss


PRED = torch.zeros(2, 4)
TGT = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])


def test_l2_sum_with_inverse_sqrt_dim_scale():
    loss, _ = Data2VecTarget(loss="l2").loss(PRED, TGT)
    # per-token squared error summed over channels: 4 and 4; x 1/sqrt(4); summed over tokens
    assert loss.item() == pytest.approx(8 * 0.5)


def test_fixed_scale_and_mean_reduction():
    loss, _ = Data2VecTarget(loss="l2", loss_scale=1.0).loss(PRED, TGT)
    assert loss.item() == pytest.approx(8.0)
    loss, _ = Data2VecTarget(loss="l2", loss_scale=1.0, reduction="mean").loss(PRED, TGT)
    assert loss.item() == pytest.approx(8.0 / 8)


def test_smooth_l1_beta_by_hand():
    # beta=1: |d|=1 -> 0.5 each (row 0: 2.0); |d|=2 -> 2 - 0.5 = 1.5 (row 1: 1.5)
    loss, _ = Data2VecTarget(loss="smooth_l1", beta=1.0).loss(PRED, TGT)
    assert loss.item() == pytest.approx((2.0 + 1.5) * 0.5)
    # beta=4: all |d| < 4 -> 0.5 d^2 / 4: row 0: 4 * 0.125, row 1: 0.5 * 4 / 4
    loss, _ = Data2VecTarget(loss="smooth_l1", beta=4.0, loss_scale=1.0).loss(PRED, TGT)
    assert loss.item() == pytest.approx(0.5 + 0.5)
    # vision 1.0: smooth L1 beta 2, mean over all 8 elements, no scaling
    loss, _ = Data2VecTarget(loss="smooth_l1", beta=2.0, loss_scale=1.0, reduction="mean").loss(PRED, TGT)
    # elements: four 1s -> 0.25 each, one 2 -> 2 - 1 = 1.0, three 0s -> 0
    assert loss.item() == pytest.approx((4 * 0.25 + 1.0) / 8)


def test_loss_gradient_flows_to_prediction_only():
    pred = torch.zeros(2, 4, requires_grad=True)
    loss, _ = Data2VecTarget().loss(pred, TGT)
    loss.backward()
    # d/dpred of 0.5 * sum (pred - t)^2 = 0.5 * 2 (pred - t) = -t
    assert torch.allclose(pred.grad, -TGT)


def test_std_stats_as_fairseq_compute_var():
    y = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    # unbiased variance per channel over 2 rows: 2 and 8
    expected = (math.sqrt(2 + 1e-6) + math.sqrt(8 + 1e-6)) / 2
    assert float(channel_std(y)) == pytest.approx(expected, rel=1e-6)
    _, stats = Data2VecTarget().loss(torch.zeros(2, 2), y)
    assert stats["target_std"] == pytest.approx(expected, rel=1e-6)
    assert stats["pred_std"] == pytest.approx(1e-3, rel=1e-3)  # sqrt(0 + 1e-6)


def _sync_worker(rank: int, world: int, port: int, rows: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mine = rows[rank::world]
        out[rank] = (float(channel_std(mine, sync=True)), float(channel_std(mine, sync=False)))
    finally:
        dist.destroy_process_group()


def test_std_is_all_reduced_across_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = torch.randn(9, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_sync_worker, args=(2, port, rows, out), nprocs=2, join=True)
    # both processes see the statistic of all 9 rows, not of their own share
    assert out[0][0] == pytest.approx(float(channel_std(rows)), rel=1e-5)
    assert out[1][0] == pytest.approx(float(channel_std(rows)), rel=1e-5)
    assert out[0][1] != pytest.approx(out[0][0], rel=1e-3)
