"""Optimizers: which parameters decay, and layer-wise learning-rate decay."""

import copy

import pytest
import torch
from torch import nn

from d2v.train import optim
from d2v.api.errors import SpecError
from d2v.spec.model import TaskModel
from d2v.train.optim import adam, adamw
from d2v.train.schedules import constant


def _model(toy):
    return TaskModel(toy.ToyFeatures(dim=8), toy.ToyEncoder(dim=8, layers=2), toy.ToyRegressionHead(input_dim=8))


def _group_of(opt, param):
    return next(g for g in opt.param_groups if any(p is param for p in g["params"]))


def test_adamw_excludes_biases_and_norms_from_weight_decay():
    import toy

    model = _model(toy)
    opt = adamw(model, lr=1e-3, weight_decay=0.05)
    assert _group_of(opt, model.head.proj.weight)["weight_decay"] == 0.05
    assert _group_of(opt, model.head.proj.bias)["weight_decay"] == 0.0
    assert _group_of(opt, model.encoder.mask_embedding)["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_layer_decay_scales_lr_by_depth():
    import toy

    model = _model(toy)
    opt = adamw(model, lr=1.0, layer_decay=0.5)
    # 2 layers: head = top (1.0), layer 1 -> 0.5, layer 0 -> 0.25, feature extractor -> 0.125
    assert _group_of(opt, model.head.proj.weight)["lr"] == pytest.approx(1.0)
    assert _group_of(opt, model.encoder.layers[1][0].weight)["lr"] == pytest.approx(0.5)
    assert _group_of(opt, model.encoder.layers[0][0].weight)["lr"] == pytest.approx(0.25)
    assert _group_of(opt, model.feature_extractor.proj.weight)["lr"] == pytest.approx(0.125)


def test_frozen_parameters_are_left_out_and_all_frozen_is_an_error():
    import toy

    from d2v.api.errors import SpecError

    model = _model(toy)
    model.feature_extractor.requires_grad_(False)
    opt = adam(model, lr=1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len([p for p in model.parameters() if p.requires_grad])
    model.requires_grad_(False)
    with pytest.raises(SpecError, match="no trainable parameters"):
        adam(model)


def test_constant_schedule_warms_up_then_holds():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = constant(opt, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_optimizers_are_fused_by_default_and_step_like_the_foreach_version():
    """``fused: auto`` picks torch's fused AdamW kernel; its updates equal the for-each version's."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    results = []
    for name, fused in (("adamw", "auto"), ("adamw", False), ("adam", "auto"), ("adam", False)):
        model = copy.deepcopy(reference)
        build = optim.adamw if name == "adamw" else optim.adam
        opt = build(model, lr=1e-2, fused=fused)
        assert bool(opt.defaults["fused"]) is (fused == "auto")
        for step in range(5):
            torch.manual_seed(step)
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[2], results[3], atol=1e-6, rtol=1e-6)
    with pytest.raises(SpecError, match="optim.fused"):
        optim.adamw(reference, fused="yes")
