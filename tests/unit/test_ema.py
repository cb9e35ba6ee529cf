"""d2v.ssl.ema: the EMA teacher and the decay schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from d2v.ssl.ema import EMATeacher, annealed_decay, matches_any


def test_annealed_decay_values():
    start, end, n = 0.999, 0.9999, 1000
    assert annealed_decay(0, start, end, n) == pytest.approx(0.999, abs=1e-12)
    assert annealed_decay(500, start, end, n) == pytest.approx(0.99945, abs=1e-12)
    assert annealed_decay(250, start, end, n) == pytest.approx(0.999225, abs=1e-12)
    assert annealed_decay(1000, start, end, n) == end
    assert annealed_decay(5000, start, end, n) == end
    assert annealed_decay(0, start, end, 0) == end  # no annealing: constant end
    with pytest.raises(ValueError):
        annealed_decay(0, start, end, -1)


def _linear(w, b):
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([w]))
        m.bias.copy_(torch.tensor([b]))
    return m


def test_hand_computed_ema_two_steps():
    student = _linear([1.0, 2.0], 0.0)
    teacher = EMATeacher(student)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[3.0, 6.0]]))
        student.bias.fill_(1.0)
    assert teacher.update(student, 0.5)
    # 0.5 * [1, 2] + 0.5 * [3, 6] = [2, 4]; 0.5 * 0 + 0.5 * 1 = 0.5
    assert torch.equal(teacher.model.weight, torch.tensor([[2.0, 4.0]]))
    assert torch.equal(teacher.model.bias, torch.tensor([0.5]))
    with torch.no_grad():
        student.weight.zero_()
        student.bias.zero_()
    teacher.update(student, 0.75)
    # 0.75 * [2, 4] + 0.25 * 0 = [1.5, 3]; 0.75 * 0.5 = 0.375
    assert torch.equal(teacher.model.weight, torch.tensor([[1.5, 3.0]]))
    assert torch.equal(teacher.model.bias, torch.tensor([0.375]))
    # the teacher's forward is the copied module's
    assert torch.equal(teacher(torch.tensor([[1.0, 1.0]])), torch.tensor([[4.875]]))


def test_decay_one_is_frozen_and_decay_zero_copies():
    student = _linear([1.0, 2.0], 0.0)
    teacher = EMATeacher(student, copy_keys=["bias"])
    with torch.no_grad():
        student.weight.fill_(7.0)
        student.bias.fill_(7.0)
    assert teacher.update(student, 1.0) is False
    assert torch.equal(teacher.model.weight, torch.tensor([[1.0, 2.0]]))
    assert torch.equal(teacher.model.bias, torch.tensor([0.0]))  # frozen means nothing moves
    teacher.update(student, 0.0)
    assert torch.equal(teacher.model.weight, student.weight)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            teacher.update(student, bad)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_conv = nn.Conv1d(2, 2, 3, padding=1)
        self.proj = nn.Linear(2, 2)
        self.norm = nn.BatchNorm1d(2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):  # (B, C, T)
        x = self.norm(x + self.pos_conv(x))
        return self.drop(self.proj(x.transpose(1, 2)))


def test_copy_keys_are_copied_exactly_and_buffers_follow():
    torch.manual_seed(0)
    student = Tiny()
    teacher = EMATeacher(student, copy_keys=("pos_conv",))
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.norm.running_mean.fill_(3.0)
    teacher.update(student, 0.9)
    t = dict(teacher.model.named_parameters())
    for name, p in student.named_parameters():
        if name.startswith("pos_conv."):
            assert torch.equal(t[name], p)
        else:
            torch.testing.assert_close(t[name], 0.9 * before[name] + 0.1 * p.detach(), rtol=0, atol=1e-6)
    assert torch.equal(teacher.model.norm.running_mean, torch.full((2,), 3.0))


def test_student_params_without_grad_are_copied():
    student = _linear([1.0, 2.0], 0.0)
    teacher = EMATeacher(student)
    student.bias.requires_grad_(False)
    with torch.no_grad():
        student.bias.fill_(5.0)
        student.weight.fill_(3.0)
    teacher.update(student, 0.5)
    assert torch.equal(teacher.model.bias, torch.tensor([5.0]))
    assert torch.equal(teacher.model.weight, torch.tensor([[2.0, 2.5]]))


def test_matches_any():
    assert matches_any("encoder.pos_conv.0.weight", ["pos_conv"])
    assert matches_any("pos_conv.weight", ["pos_conv"])
    assert not matches_any("encoder.pos_conv_x.weight", ["pos_conv"])
    assert matches_any("embed_tokens.weight", ["embed_*"])
    assert not matches_any("layers.0.fc1.weight", ["pos_conv", "embed_*"])


def test_no_grads_flow_to_the_teacher():
    torch.manual_seed(0)
    student = Tiny()
    x = torch.randn(3, 2, 5)
    student(x).sum().backward()  # the student has .grad now; the copy must not carry it
    teacher = EMATeacher(student)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    y = teacher(x)
    assert not y.requires_grad
    loss = (student(x) - y).pow(2).sum()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_teacher_stays_in_eval_mode():
    student = Tiny().train()
    parent = nn.Module()
    parent.student = student
    parent.teacher = EMATeacher(student)
    parent.train()
    assert student.training and not parent.teacher.model.training and not parent.teacher.model.drop.training
    x = torch.randn(2, 2, 4)
    torch.testing.assert_close(parent.teacher(x), parent.teacher(x))  # no dropout
    follow = EMATeacher(student, eval_mode=False)
    assert follow.model.training
    follow.eval()
    assert not follow.model.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_teacher_stays_fp32_with_a_low_precision_student(dtype):
    torch.manual_seed(0)
    student = Tiny().to(dtype)
    teacher = EMATeacher(student, copy_keys=("pos_conv",))
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.model.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5)
    teacher.update(student, 0.999)
    for name, p in student.named_parameters():
        t = teacher.model.get_parameter(name)
        assert t.dtype == torch.float32
        if not name.startswith("pos_conv."):
            expected = 0.999 * before[name] + 0.001 * p.detach().float()
            torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)
    # a parent's dtype cast must not demote the EMA
    parent = nn.Module()
    parent.teacher = teacher
    parent.to(dtype)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    parent.half()
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


def test_state_dict_round_trip_is_exact():
    torch.manual_seed(0)
    student = Tiny()
    teacher = EMATeacher(student, copy_keys=("pos_conv",))
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        teacher.update(student, 0.7)
    state = teacher.state_dict()
    assert all(k.startswith("model.") for k in state)

    restored = EMATeacher(Tiny(), copy_keys=("pos_conv",))
    restored.load_state_dict(state)
    for (k, a), (_, b) in zip(teacher.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), k
    teacher.update(student, 0.9)
    restored.update(student, 0.9)
    for (k, a), (_, b) in zip(teacher.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), k


def test_reset_and_mismatch_errors():
    student = _linear([1.0, 2.0], 0.0)
    teacher = EMATeacher(student)
    with torch.no_grad():
        student.weight.fill_(9.0)
    teacher.reset(student)
    assert torch.equal(teacher.model.weight, student.weight)
    with pytest.raises(ValueError, match="shape"):
        teacher.update(nn.Linear(3, 1), 0.5)
    wrapped = nn.Sequential(student)  # e.g. passing a wrapper instead of the module itself
    with pytest.raises(ValueError, match="unwrapped"):
        teacher.update(wrapped, 0.5)


def test_weight_norm_pos_conv_is_copyable():
    """The audio positional conv uses weight norm; the teacher must deep-copy and update it."""
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1, groups=2), name="weight", dim=2)
    student = nn.Sequential()
    student.pos_conv = conv
    student(torch.randn(1, 4, 6)).sum().backward()
    teacher = EMATeacher(student, copy_keys=("pos_conv",))
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2.0)
    teacher.update(student, 0.9)
    for name, p in student.named_parameters():
        assert torch.equal(teacher.model.get_parameter(name), p)
