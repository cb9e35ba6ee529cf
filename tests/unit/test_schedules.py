"""Learning-rate schedules against hand-computed values."""

import math

import pytest
import torch

from d2v.train.schedules import cosine, cosine_factor, tri_stage, tri_stage_factor


def test_tri_stage_phases():
    f = lambda s: tri_stage_factor(s, 100, (0.1, 0.4, 0.5), 0.01, 0.05)  # noqa: E731
    assert f(0) == pytest.approx(0.01)
    assert f(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(10) == f(49) == 1.0
    assert f(50) == 1.0
    assert f(75) == pytest.approx(math.exp(math.log(0.05) * 25 / 50))
    assert f(100) == pytest.approx(0.05)
    assert f(1000) == 0.05


def test_cosine():
    assert cosine_factor(0, 100, 10, 0.0) == 0.0
    assert cosine_factor(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert cosine_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert cosine_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_schedulers_drive_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = tri_stage(opt, total_steps=10, phase_ratio=[0.2, 0.3, 0.5], init_lr_scale=0.5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0) and lrs[2] == pytest.approx(2.0)
    opt2 = torch.optim.SGD([param], lr=1.0)
    sched2 = cosine(opt2, total_steps=4, warmup_ratio=0.5)
    assert opt2.param_groups[0]["lr"] == 0.0


def test_polynomial_is_fairseq_linear_decay():
    from d2v.train.schedules import polynomial, polynomial_factor

    # RTE recipe shape: 122 warmup updates of 2036, linear decay to 0
    assert polynomial_factor(0, 2036, 122, 1.0, 0.0) == 0.0
    assert polynomial_factor(61, 2036, 122, 1.0, 0.0) == pytest.approx(0.5)
    assert polynomial_factor(122, 2036, 122, 1.0, 0.0) == pytest.approx(1.0)
    assert polynomial_factor(122 + 957, 2036, 122, 1.0, 0.0) == pytest.approx(0.5)
    assert polynomial_factor(2036, 2036, 122, 1.0, 0.0) == pytest.approx(0.0)
    assert polynomial_factor(55, 100, 10, 2.0, 0.0) == pytest.approx(0.25)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2e-5)
    polynomial(opt, total_steps=10, warmup_steps=2)
    assert opt.param_groups[0]["lr"] == 0.0


def test_tri_stage_cannot_decay_exponentially_to_zero():
    from d2v.api.errors import SpecError

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(SpecError, match="cosine"):
        tri_stage(opt, total_steps=10, final_lr_scale=0.0)
