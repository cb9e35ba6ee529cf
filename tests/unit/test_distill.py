"""data2vec 1.0 self-distillation (core/d2v/distill.py) on the tiny audio model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from distill_helpers import build_tiny, train_on_waves, waves

from d2v import plugins
from d2v.distill import PretrainOutput, SelfDistillation, TrainingCollapse, check_collapse, regression_head
from d2v.errors import TrainingCollapse as CoreTrainingCollapse
from d2v.model import TaskModel, load_initial_weights

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

SPAN = {"name": "span", "mask_prob": 0.65, "mask_length": 3}


def build(**objective) -> SelfDistillation:
    return build_tiny({"name": "data2vec", "target": {"name": "data2vec", "top_k": 2}, "masking": SPAN, **objective})


def test_registered_and_built_from_a_spec():
    reg = plugins.registry()
    assert reg.get("objective", "data2vec").resolve() is SelfDistillation
    model = build()
    assert isinstance(model.regression_head, torch.nn.Linear)
    out = model(waves())
    assert isinstance(out, PretrainOutput) and out.loss.dim() == 0
    assert {"loss", "target_std", "pred_std", "ema_decay", "masked_frac"} <= set(out.logs)
    assert out.sample_size > 0 and 0 < out.logs["masked_frac"] < 1


def test_two_layer_head_as_text():
    head = regression_head(8, 2)
    assert [type(m).__name__ for m in head] == ["Linear", "GELU", "Linear"]
    assert head[0].out_features == 16 and head[2].out_features == 8


def test_teacher_gets_unmasked_features_and_student_gets_mask():
    torch.manual_seed(0)
    model = build()
    seen = {}
    model.teacher.model.register_forward_hook(lambda m, a, kw, out: seen.update(teacher=(a, kw)), with_kwargs=True)
    model.encoder.register_forward_hook(lambda m, a, kw, out: seen.update(student=(a, kw)), with_kwargs=True)
    batch = waves()
    out = model(batch)
    features = model.feature_extractor(batch["inputs"], batch["padding_mask"]).features
    t_args, t_kwargs = seen["teacher"]
    assert torch.equal(t_args[0], features)  # the student's features, unmasked
    assert len(t_args) < 3 and t_kwargs.get("mask") is None
    assert t_kwargs["output_layer_targets"] and t_kwargs["target_feature"] == "ffn"
    s_args, _ = seen["student"]
    mask = s_args[2]
    assert mask is not None and int(mask.sum()) == out.sample_size
    assert not model.teacher.model.training  # dropout/layerdrop off in the teacher


def test_loss_is_target_loss_per_masked_token():
    torch.manual_seed(0)
    model = build()
    batch = waves()
    batch["mask"] = torch.zeros(2, 14, dtype=torch.bool)
    batch["mask"][0, 2:6] = True
    batch["mask"][1, 7:11] = True
    out = model(batch)
    with torch.no_grad():
        fe = model.feature_extractor(batch["inputs"], batch["padding_mask"])
        targets = model.target(model.teacher(fe.features, fe.padding_mask, output_layer_targets=True), batch["mask"])
        student = model.encoder(fe.features, fe.padding_mask, batch["mask"]).last_hidden_state
        pred = model.regression_head(student[batch["mask"]])
        expected = ((pred - targets) ** 2).sum() / math.sqrt(64) / 8
    assert out.sample_size == 8
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_no_gradient_reaches_the_teacher():
    model = build()
    assert all(not p.requires_grad for p in model.teacher.parameters())
    model(waves()).loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.encoder.layers[0].ffn.fc1.weight.grad is not None
    from d2v.optim import adam  # the spec's optimizer builder skips frozen parameters

    opt = adam(model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.teacher.parameters())


def test_ema_update_with_annealed_decay_by_hand():
    model = build(ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10)
    name = "layers.0.ffn.fc1.weight"
    student = dict(model.encoder.named_parameters())[name]
    teacher = dict(model.teacher.model.named_parameters())[name]
    with torch.no_grad():
        student.fill_(1.0)
        teacher.fill_(3.0)
    model.after_optimizer_step(5)
    # step 5 of 10: 0.99 - (0.99 - 0.9) * (1 - 5/10) = 0.945
    assert teacher[0, 0].item() == pytest.approx(0.945 * 3.0 + 0.055 * 1.0, rel=1e-6)
    assert model.current_decay() == pytest.approx(0.945)
    model.after_optimizer_step(20)  # past the anneal: end decay
    assert teacher[0, 0].item() == pytest.approx(0.99 * (0.945 * 3 + 0.055) + 0.01, rel=1e-6)
    assert int(model.num_updates) == 20


def test_positional_conv_is_copied_not_averaged():
    model = build(ema_decay=0.5, ema_end_decay=0.5)
    conv = model.encoder.pos_conv.layers[0].conv.weight
    with torch.no_grad():
        conv.add_(1.0)
    model.after_optimizer_step(1)
    assert torch.equal(model.teacher.model.pos_conv.layers[0].conv.weight, conv)
    # while the layers are averaged
    s = model.encoder.layers[0].ffn.fc1.weight
    with torch.no_grad():
        s.add_(1.0)
    before = model.teacher.model.layers[0].ffn.fc1.weight.clone()
    model.after_optimizer_step(2)
    assert torch.allclose(model.teacher.model.layers[0].ffn.fc1.weight, 0.5 * before + 0.5 * s)


def test_ema_scope_all_runs_teacher_on_raw_input():
    model = build(ema_scope="all", copy_keys=None, target_feature="end")
    assert set(dict(model.teacher.model.named_children())) == {"feature_extractor", "encoder"}
    seen = {}
    model.teacher.model["feature_extractor"].register_forward_hook(lambda m, a, out: seen.update(x=a[0]))
    batch = waves()
    batch["teacher_inputs"] = batch["inputs"] * 2
    model(batch)
    assert torch.equal(seen["x"], batch["teacher_inputs"])
    model.after_optimizer_step(1)


def test_collapse_guard_raises_with_a_clear_message():
    assert TrainingCollapse is CoreTrainingCollapse
    model = build(collapse_check_after=3, min_target_std=100.0)
    model(waves())  # step 0 <= 3: no check
    model.num_updates.fill_(4)
    with pytest.raises(TrainingCollapse) as info:
        model(waves())
    message = str(info.value)
    assert "step 4" in message and "target std" in message and "min_target_std 100" in message
    assert "optim.lr" in message and "ema_anneal_end_step" in message and "check the data" in message
    model.eval()
    model(waves())  # evaluation never raises
    with pytest.raises(TrainingCollapse, match="prediction std 0.001 < min_pred_std 0.01"):
        check_collapse(5001, 0.5, 0.001, after=5000, min_target_std=0.1, min_pred_std=0.01)
    check_collapse(5000, 0.0, 0.0, after=5000, min_target_std=0.1, min_pred_std=0.01)  # not yet


def test_pretraining_checkpoint_initialises_a_finetuning_model(tmp_path):
    from safetensors.torch import save_file

    model = build()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    fresh = build()
    task = TaskModel(fresh.feature_extractor, fresh.encoder, None)
    report = load_initial_weights(task, tmp_path)
    assert report.new == [] and report.mismatched == []
    assert all(k.startswith(("teacher.", "regression_head.", "num_updates")) for k in report.unused)
    assert torch.equal(task.encoder.layers[1].ffn.fc2.weight, model.encoder.layers[1].ffn.fc2.weight)


def test_loss_decreases_on_a_tiny_synthetic_task():
    torch.manual_seed(0)
    model = build(ema_decay=0.99, ema_end_decay=0.999, ema_anneal_end_step=30)
    losses, out = train_on_waves(model, steps=30)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses
    assert out.logs["target_std"] > 0.1


def test_ls960_recipe_is_the_reference_one():
    """experiments/pretrain_audio_ls960.yaml = REFERENCE.md §1.2 (fairseq base_librispeech.yaml)."""
    from d2v.config import load_spec, resolve_model_section

    spec = load_spec(Path(__file__).resolve().parents[2] / "experiments" / "pretrain_audio_ls960.yaml")
    model = resolve_model_section(spec["model"], plugins.registry())
    obj = model["objective"]
    assert (spec["task"], obj["name"], model["encoder"]["layers"], model["encoder"]["dim"]) == ("pretrain", "data2vec", 12, 768)
    assert model["encoder"]["layerdrop"] == 0.05
    assert obj["target"] == {"name": "data2vec", "top_k": 8, "layer_norm": "instance", "final_norm": None,
                             "loss": "l2", "loss_scale": None, "reduction": "sum"}
    assert (obj["masking"]["name"], obj["masking"]["mask_prob"], obj["masking"]["mask_length"]) == ("span", 0.65, 10)
    assert (obj["ema_decay"], obj["ema_end_decay"], obj["ema_anneal_end_step"]) == (0.999, 0.9999, 30000)
    assert obj["copy_keys"] == ["pos_conv"] and obj["ema_scope"] == "encoder" and obj["target_feature"] == "ffn"
    assert spec["optim"] == {"name": "adam", "lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01}
    assert spec["schedule"]["name"] == "tri_stage" and spec["schedule"]["phase_ratio"] == [0.03, 0.9, 0.07]
    assert spec["trainer"]["max_steps"] == 400000
    proc = spec["data"]["processor"]
    assert (proc["min_samples"], proc["max_samples"], proc["normalize"]) == (32000, 320000, True)
    assert spec["data"]["loader"]["max_batch_seconds"] * 16000 == 3.8e6


def test_pre_corrupted_inputs_are_regressed_without_masking_again():
    """A processor that corrupted the inputs itself (BERT-masked text) hands over
    ``corrupted_mask``: the student regresses exactly those positions and its encoder is called
    without a mask; no masking component is needed."""
    from d2v.errors import SpecError

    torch.manual_seed(0)
    model = build_tiny({"name": "data2vec", "target": {"name": "data2vec", "top_k": 2}})
    batch = waves()
    frames = model.feature_extractor(batch["inputs"], batch["padding_mask"]).features.shape[1]
    with pytest.raises(SpecError, match="no masking"):
        model(batch)
    corrupted = torch.zeros(2, frames, dtype=torch.bool)
    corrupted[:, 1::3] = True
    seen = {}
    model.encoder.register_forward_hook(lambda m, a, kw, out: seen.update(student=a), with_kwargs=True)
    out = model({**batch, "corrupted_mask": corrupted})
    assert seen["student"][2] is None
    assert out.sample_size == int(corrupted.sum())


def test_updates_continue_from_the_count_the_weights_arrived_with():
    """An imported fairseq checkpoint sets num_updates (e.g. 400000); a new run's step 1 is its
    update 400001, so the EMA decay schedule does not restart. A fresh run and a resumed run
    (num_updates = step - 1 when step arrives) are unchanged."""
    imported = build(ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10)
    imported.num_updates.fill_(400)
    imported.after_optimizer_step(1)
    imported.after_optimizer_step(2)
    assert int(imported.num_updates) == 402 and imported.current_decay() == pytest.approx(0.99)
    resumed = build()
    resumed.num_updates.fill_(7)
    resumed.after_optimizer_step(8)
    assert int(resumed.num_updates) == 8


def test_masks_drawn_in_the_loader_depend_only_on_the_batch():
    """make_batch_transform draws 1.0's masks from the batch's own generator (seeded by its ids in
    the loader), so the same batch gets the same mask on any process; the student uses it, and a
    mask that does not fit the features is an error naming both shapes."""
    import numpy as np

    from d2v.errors import SpecError

    model = build()
    transform = model.make_batch_transform()
    batch = waves()
    a = transform(dict(batch), rng=np.random.default_rng(7))["precomputed_mask"]
    b = transform(dict(batch), rng=np.random.default_rng(7))["precomputed_mask"]
    assert a.shape[:2] == (2, 1) and torch.equal(a, b) and bool(a.any())
    seen = {}
    model.encoder.register_forward_hook(lambda m, args, out: seen.update(mask=args[2]))
    out = model({**batch, "precomputed_mask": a})
    assert torch.equal(seen["mask"], a[:, 0]) and out.sample_size == int(a.sum())
    with pytest.raises(SpecError, match=r"precomputed_mask has shape \(2, 1, 3\) but the features need"):
        model({**batch, "precomputed_mask": a[..., :3]})
