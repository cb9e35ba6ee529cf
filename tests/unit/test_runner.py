"""The runner: training lowers the loss, checkpoints are atomic, kill + resume is exact."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2v.spec.config import spec_from_dict
from d2v.api.errors import SpecError
from d2v.train import Run, run
from d2v.train import loop as train_module
from d2v.train import step as step_module

ROOT = Path(__file__).resolve().parents[2]


def _final_weights(output_dir):
    return load_file(str(output_dir / "final" / "model.safetensors"))


def test_training_lowers_loss_and_writes_run_dir(toy_plugin, tmp_path):
    out = tmp_path / "run"
    run(spec_from_dict(toy_plugin.toy_spec(out, max_steps=24, eval_every=8)))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in train] == list(range(1, 25))
    assert sum(r["loss"] for r in train[-4:]) < 0.6 * sum(r["loss"] for r in train[:4])
    assert valid[-1]["mse"] < valid[0]["mse"]
    assert (out / "spec.yaml").exists() and (out / "final" / "spec.yaml").exists()
    assert (out / "checkpoints" / "latest").read_text() == "step-00000024"


def test_kill_and_resume_gives_the_same_weights(toy_plugin, tmp_path, monkeypatch):
    reference = tmp_path / "uninterrupted"
    run(spec_from_dict(toy_plugin.toy_spec(reference, max_steps=12, save_every=4)))

    killed = tmp_path / "killed"
    spec = toy_plugin.toy_spec(killed, max_steps=12, save_every=4)
    real_write = train_module.MetricsLog.write

    def die_after_step_6(self, record):
        real_write(self, record)
        if record.get("step") == 6 and record.get("split") == "train":
            raise KeyboardInterrupt  # the process is killed between checkpoints
    monkeypatch.setattr(train_module.MetricsLog, "write", die_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(spec_from_dict(spec))
    monkeypatch.setattr(train_module.MetricsLog, "write", real_write)
    assert (killed / "checkpoints" / "latest").read_text() == "step-00000004"
    assert not (killed / "final").exists()

    with pytest.raises(SpecError, match="--resume"):
        run(spec_from_dict(spec))  # never silently overwrite a run
    original_spec = (killed / "spec.yaml").read_text()
    spec["trainer"]["log_every"] = 2  # a changed spec on resume is kept beside the original
    run(spec_from_dict(spec), resume=True)
    assert (killed / "spec.yaml").read_text() == original_spec
    assert "log_every: 2" in (killed / "spec.resumed-at-00000004.yaml").read_text()

    a, b = _final_weights(reference), _final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_gradient_accumulation_counts_optimizer_steps(toy_plugin, tmp_path):
    out = tmp_path / "accum"
    run(spec_from_dict(toy_plugin.toy_spec(out, max_steps=3, grad_accum=2)))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "train"] == [1, 2, 3]


def test_evaluate_task_writes_predictions(toy_plugin, tmp_path):
    out = tmp_path / "train"
    run(spec_from_dict(toy_plugin.toy_spec(out, max_steps=4)))
    spec = toy_plugin.toy_spec(tmp_path / "eval")
    spec["task"] = "evaluate"
    spec["data"]["test"] = spec["data"].pop("valid")
    spec["evaluate"] = {"checkpoint": str(out / "final"), "split": "test"}
    metrics = run(spec_from_dict(spec))
    lines = (tmp_path / "eval" / "hypotheses.tsv").read_text().splitlines()
    assert lines[0] == "id\treference\thypothesis" and len(lines) == 17
    saved = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    assert saved["mse"] == pytest.approx(metrics["mse"])


def test_init_reports_loaded_and_new_weights(toy_plugin, tmp_path, capsys):
    out = tmp_path / "base"
    run(spec_from_dict(toy_plugin.toy_spec(out, max_steps=2)))
    spec = toy_plugin.toy_spec(tmp_path / "ft", max_steps=1)
    spec["model"]["head"]["out_dim"] = 2
    spec["model"]["init"] = {"checkpoint": str(out / "final")}
    runner = Run(spec_from_dict(spec))
    weights = _final_weights(out)
    torch.testing.assert_close(runner.model.encoder.layers[0][0].weight, weights["encoder.layers.0.0.weight"])
    assert "tensors loaded" in capsys.readouterr().out


def test_the_ddp_probe_runs_on_the_device_the_model_trains_on(toy_plugin, tmp_path):
    """Before ``prepare`` wraps the model in DDP, a probe batch decides find_unused_parameters.
    It used to send the batch to the accelerator's device with the model still on the CPU: every
    multi-GPU run stopped at start-up. A CPU run cannot see that (one device), so the accelerator
    here claims the meta device, and the forward checks that model and batch are on it."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    runner = Run(spec_from_dict(toy_plugin.toy_spec(tmp_path / "run", max_steps=1)))
    try:
        device = torch.device("meta")
        runner.accelerator = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_GPU, device=device,
                                             ddp_handler=SimpleNamespace(find_unused_parameters=True))
        seen = []

        def forward(batch):
            seen.append({t.device for t in [*runner.model.parameters(), *runner.model.buffers()]}
                        | {v.device for v in batch.values() if isinstance(v, torch.Tensor)})
            params = [p for p in runner.model.parameters() if p is not runner.model.head.proj.bias]
            return SimpleNamespace(loss=sum(p.sum() for p in params) * 0.0)

        runner.model.forward = forward
        step_module.set_find_unused_parameters(runner, runner.datasets["train"], None)
        assert seen == [{device}]  # one probe, everything on the accelerator's device
        assert runner.accelerator.ddp_handler.find_unused_parameters is True  # the bias got no gradient
        assert all(p.grad is None for p in runner.model.parameters())
    finally:
        runner.release()


def test_the_ddp_probe_leaves_no_trace():
    """The probe's forward/backward must not change what the run then computes: batch-norm
    statistics, the RNG and the gradients are as before it (one process never probes)."""
    from types import SimpleNamespace

    from d2v.train.parallel import unused_parameters

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.used, self.unused = torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)

        def forward(self, batch):
            x = torch.nn.functional.dropout(self.norm(batch["inputs"]), 0.5)
            return SimpleNamespace(loss=self.used(x).sum())

    net, batch = Net().eval(), {"inputs": torch.randn(4, 3) + 5}
    stats = [b.clone() for b in net.buffers()]
    rng = torch.get_rng_state()
    assert unused_parameters(net, batch, torch.device("cpu")) == ["unused.weight", "unused.bias"]
    assert all(torch.equal(a, b) for a, b in zip(stats, net.buffers()))
    assert torch.equal(torch.get_rng_state(), rng) and not net.training
    assert all(p.grad is None for p in net.parameters())


def _no_skips():
    from pathlib import Path

    from d2v.train.guards import SkipBudget, SkippedLog

    return SkipBudget(0.001, SkippedLog(Path("skipped.tsv")))


class _FakeAccelerator:
    def __init__(self, norm: float, scaler: bool):
        self.norm, self.scaler, self.num_processes = norm, (object() if scaler else None), 1
        self.device, self.gradient_accumulation_steps = torch.device("cpu"), 2

    def clip_grad_norm_(self, params, max_norm):
        return torch.tensor(self.norm)


class _FakeOptimizer:
    def __init__(self, skipped: bool):
        self.steps, self.step_was_skipped = 0, skipped

    def step(self):
        self.steps += 1


@pytest.mark.parametrize("norm, scaler, scaler_skips, bad_loss, stepped, skipped", [
    (1.0, False, False, None, 1, False),            # a normal update
    (float("nan"), False, False, None, 0, True),   # non-finite gradient: no optimizer step at all
    (1.0, False, False, float("nan"), 0, True),    # non-finite loss
    (float("inf"), True, True, None, 1, True),     # fp16: the scaler must see the step (to lower its scale)
    (1.0, True, True, None, 1, True),              # ... and a step it skipped counts as skipped
])
def test_guarded_update_skips_non_finite_and_scaler_skipped_steps(norm, scaler, scaler_skips, bad_loss, stepped, skipped):
    from types import SimpleNamespace

    from collections import defaultdict

    from d2v.train.pending import PendingUpdate

    fake = SimpleNamespace(accelerator=_FakeAccelerator(norm, scaler), trainer=SimpleNamespace(clip_norm=0.0),
                           deepspeed=False, skip_budget=_no_skips())
    optimizer = _FakeOptimizer(scaler_skips)
    window = defaultdict(float)
    pending = PendingUpdate()  # two micro-batches: a finite one, then the one under test
    pending.add(torch.tensor(2.0), {"target_std": torch.tensor(0.5)}, 3, lambda: "the batch of a")
    pending.add(torch.tensor(bad_loss if bad_loss is not None else 4.0), {"target_std": torch.tensor(0.7)}, 5,
                lambda: "the batch of b")
    reason = step_module.apply_update(fake, optimizer, [], pending, window)
    assert optimizer.steps == stepped
    assert (reason is not None) == skipped
    assert window["grad_norm"] == (0.0 if skipped else norm)
    if bad_loss is not None:
        assert reason == "loss nan on the batch of b"
    # finite micro-batches are counted in the logging window whatever happens to the update
    finite = 1 if bad_loss is not None else 2
    assert window["micro_batches"] == finite and window["examples"] == (3 if finite == 1 else 8)
    assert float(window["target_std"]) == pytest.approx(0.5 if finite == 1 else 1.2)
    assert not pending.items


@pytest.mark.parametrize("norm, bad_loss, deepspeed_skipped, reason", [
    (1.0, None, False, None),                                # applied by DeepSpeed, counted as applied
    (float("inf"), None, True, "gradient norm inf"),         # DeepSpeed skipped non-finite gradients
    (float("inf"), float("nan"), True, "loss nan on the batch of b"),  # a bad loss poisons its gradient
])
def test_under_deepspeed_its_own_verdict_decides_whether_the_update_counts(norm, bad_loss, deepspeed_skipped, reason):
    """DeepSpeed steps (or skips) inside backward; the runner's optimizer.step() is a no-op and
    step_was_skipped is DeepSpeed's verdict: a skip is counted as one, with d2v's explanation."""
    from collections import defaultdict
    from types import SimpleNamespace

    from d2v.train.pending import PendingUpdate

    fake = SimpleNamespace(accelerator=_FakeAccelerator(norm, scaler=False), trainer=SimpleNamespace(clip_norm=0.0),
                           deepspeed=True, skip_budget=_no_skips())
    optimizer, window, pending = _FakeOptimizer(deepspeed_skipped), defaultdict(float), PendingUpdate()
    pending.add(torch.tensor(bad_loss if bad_loss is not None else 4.0), {}, 5, lambda: "the batch of b")
    assert step_module.apply_update(fake, optimizer, [], pending, window) == reason
    assert window["grad_norm"] == (0.0 if deepspeed_skipped else norm)


def test_an_update_deepspeed_applied_but_d2v_would_skip_stops_the_run():
    from d2v.api.errors import TrainingCollapse
    from d2v.train.parallel import deepspeed_skip_reason

    assert deepspeed_skip_reason(False, None) is None
    assert deepspeed_skip_reason(True, None) == "DeepSpeed found non-finite gradients"
    with pytest.raises(TrainingCollapse, match="DeepSpeed applied an update d2v would have skipped"):
        deepspeed_skip_reason(False, "loss nan on the batch of b")


def test_a_non_finite_loss_under_deepspeed_poisons_its_gradient_and_a_finite_one_is_untouched():
    """A NaN added to the loss leaves the gradients finite: DeepSpeed would apply them. The loss
    DeepSpeedLoss hands to backward makes them non-finite, so DeepSpeed skips the update."""
    from types import SimpleNamespace

    from d2v.train.parallel import DeepSpeedLoss

    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 2), torch.randn(3, 4)
    deepspeed_loss = DeepSpeedLoss(model, SimpleNamespace(device=torch.device("cpu")), normalize=False)
    model(x).pow(2).mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    deepspeed_loss(model(x).pow(2).mean(), None).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain))
    model.zero_grad()
    (model(x).pow(2).mean() + float("nan")).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())  # what DeepSpeed would apply
    model.zero_grad()
    deepspeed_loss(model(x).pow(2).mean() + float("nan"), None).backward()
    assert not any(bool(torch.isfinite(p.grad).any()) for p in model.parameters())


def test_layerdrop_cannot_run_under_deepspeed():
    from d2v.api import plugins
    from d2v.spec.config import load_spec
    from d2v.spec.model import build_model
    from d2v.train.parallel import refuse_under_deepspeed

    spec = load_spec(ROOT / "experiments" / "asr_demo.yaml", ["model.encoder.layerdrop=0.1"])
    model = build_model(spec["model"], plugins.registry(), "finetune")
    with pytest.raises(SpecError, match=r"model.encoder.layerdrop > 0 \(AudioTransformerEncoder\) cannot run under "
                                        r"DeepSpeed ZeRO-2.*Set model.encoder.layerdrop: 0, or use DDP or FSDP"):
        refuse_under_deepspeed(model, task="finetune", grad_accum=1)
    model.encoder.layerdrop = 0.0
    refuse_under_deepspeed(model, task="finetune", grad_accum=4)  # accumulating is fine for task heads


@pytest.mark.parametrize("processes", [1, 2])
def test_checkpoints_resume_only_under_the_setup_that_wrote_them(tmp_path, processes):
    """A DeepSpeed checkpoint read without DeepSpeed (or the reverse) used to be reported as
    damaged; it is a clear error naming both layouts, as is another number of processes. A
    missing optimizer partition is damage (DeepSpeed itself would resume without it)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from d2v.train.parallel import check_checkpoint_layout

    plain, deepspeed = tmp_path / "plain", tmp_path / "deepspeed"
    (plain / "model.safetensors").parent.mkdir()
    (plain / "model.safetensors").write_bytes(b"")
    (deepspeed / "pytorch_model").mkdir(parents=True)
    (deepspeed / "trainer_state.json").write_text(json.dumps({"step": 2, "processes": 2}))
    for name in ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]:
        (deepspeed / "pytorch_model" / name).write_bytes(b"")
    under_ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=processes)
    under_deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=processes)
    check_checkpoint_layout(plain, under_ddp)
    with pytest.raises(SpecError, match="is in DeepSpeed's layout .*this run is not under DeepSpeed and reads "
                                        "Accelerate's layout .*zero_to_fp32.py"):
        check_checkpoint_layout(deepspeed, under_ddp)
    with pytest.raises(SpecError, match="is in Accelerate's layout .*this run is under DeepSpeed and reads "
                                        "DeepSpeed's layout"):
        check_checkpoint_layout(plain, under_deepspeed)
    if processes == 1:
        with pytest.raises(SpecError, match="written by 2 DeepSpeed processes and this run has 1.*--num_processes 2"):
            check_checkpoint_layout(deepspeed, under_deepspeed)
    else:
        with pytest.raises(FileNotFoundError, match="lacks zero_pp_rank_1_mp_rank_00_optim_states.pt"):
            check_checkpoint_layout(deepspeed, under_deepspeed)
        (deepspeed / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
        check_checkpoint_layout(deepspeed, under_deepspeed)
