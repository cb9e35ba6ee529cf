"""An update's gradient under the data2vec objectives is fairseq's: the summed loss of all its
micro-batches divided by their total sample size, not the mean of per-micro-batch means.

With random crops every micro-batch regresses a different number of positions, so the two rules
give different gradients; the runner's must be the first, computed here by hand from the same
micro-batches at the same initial weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from d2v.spec.config import load_spec
from d2v.train import step as step_module
from d2v.train.loop import Run

ROOT = Path(__file__).resolve().parents[2]
NO_DROPOUT = ["model.encoder.dropout=0", "model.encoder.attention_dropout=0", "model.encoder.activation_dropout=0",
              "model.feature_extractor.feat_proj_dropout=0"]
SHORT = ["trainer.max_steps=1", "trainer.grad_accum=2", "trainer.eval_every=0", "trainer.eval_before_training=false",
         "trainer.progress_bar=false", "trainer.save_every=0", "data.loader.num_workers=0",
         "data.loader.max_batch_seconds=null", "data.loader.batch_size=3", "data.valid.max_examples=3"]
CASES = {
    "data2vec 1.0 audio": ("pretrain_audio_demo.yaml", []),
    "data2vec 2.0 audio": ("pretrain2_audio_demo.yaml", ["model.objective.decoder_input_dropout=0",
                                                         "model.objective.clone_batch=2"]),
}

pytestmark = pytest.mark.usefixtures("single_thread")


def _spec(name: str, extra: list[str], out: Path):
    return load_spec(ROOT / "experiments" / name, [*NO_DROPOUT, *SHORT, *extra, f"trainer.output_dir={out}"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_update_divides_the_summed_loss_by_its_total_sample_size(case, tmp_path, monkeypatch):
    os.chdir(ROOT)
    name, extra = CASES[case]
    batches, runner_grads = [], {}
    real_normalize = step_module.normalize_gradients

    def record_batches(model):
        forward = model.forward

        def recording(batch):
            batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            return forward(batch)
        model.forward = recording

    def record_gradients(grads, *args):
        real_normalize(grads, *args)
        named = {id(p.grad): n for n, p in trained.model.named_parameters() if p.grad is not None}
        runner_grads.update({named[id(g)]: g.clone() for g in grads})

    monkeypatch.setattr(step_module, "normalize_gradients", record_gradients)
    trained = Run(_spec(name, extra, tmp_path / "run"))
    record_batches(trained.model)
    trained.train()
    batches = batches[:2]  # the update's two micro-batches (then the final evaluation's)

    fresh = Run(_spec(name, extra, tmp_path / "fresh"))  # the same seed: the same initial weights
    model = fresh.model.train()
    outputs = [model(batch) for batch in batches]
    sizes = [out.sample_size for out in outputs]
    assert sizes[0] != sizes[1]  # unequal lengths: the two rules differ
    (sum(out.loss * n for out, n in zip(outputs, sizes)) / sum(sizes)).backward()
    fairseq = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (sum(out.loss for out in [model(batch) for batch in batches]) / 2).backward()
    mean_of_means = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    fresh.release()

    assert runner_grads.keys() == fairseq.keys()
    worst = max(float((runner_grads[n] - fairseq[n]).abs().max()) for n in fairseq)
    scale = max(float(g.abs().max()) for g in fairseq.values())
    assert worst <= 1e-5 * scale
    other = max(float((mean_of_means[n] - fairseq[n]).abs().max()) for n in fairseq)
    assert other > 100 * worst  # the test can tell the rules apart


class _OneOfTwoProcesses:
    """What DeepSpeedLoss asks of the Accelerator, for one of two processes: the sum of a
    micro-batch's sample size over both."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return torch.tensor([float(sum(self.sizes))])


def test_under_deepspeed_the_gradients_are_scaled_to_fairseqs_update_before_its_mean_over_processes():
    """DeepSpeed reduces and steps inside backward, so the per-update normalisation happens as the
    gradients are made: each process's gradient of ``loss * sample_size`` is scaled by
    ``processes / total sample size``, and DeepSpeed's mean over processes is fairseq's update."""
    from d2v.train.parallel import DeepSpeedLoss

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    batches, sizes = [torch.randn(5, 4), torch.randn(2, 4)], [5, 2]  # one micro-batch per process, unequal sizes
    deepspeed_loss = DeepSpeedLoss(model, _OneOfTwoProcesses(sizes), normalize=True)
    per_process = []
    for batch, size in zip(batches, sizes):
        model.zero_grad()
        deepspeed_loss(model(batch).pow(2).mean() * size, size).backward()
        per_process.append([p.grad.clone() for p in model.parameters()])
    deepspeed_mean = [(a + b) / 2 for a, b in zip(*per_process)]
    deepspeed_loss.factor.fill_(1.0)
    model.zero_grad()
    (sum(model(batch).pow(2).mean() * size for batch, size in zip(batches, sizes)) / sum(sizes)).backward()
    for ours, fairseq in zip(deepspeed_mean, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(ours, fairseq, rtol=1e-6, atol=1e-7)


def test_pretraining_cannot_accumulate_under_deepspeed():
    from d2v.api.errors import SpecError
    from d2v.train.parallel import refuse_under_deepspeed

    with pytest.raises(SpecError, match=r"trainer.grad_accum: 2 cannot run under DeepSpeed for a pretraining objective"
                                        r".*Use trainer.grad_accum: 1 with more processes or larger batches"):
        refuse_under_deepspeed(torch.nn.Linear(2, 2), task="pretrain", grad_accum=2)
    refuse_under_deepspeed(torch.nn.Linear(2, 2), task="pretrain", grad_accum=1)


def test_the_evaluation_loss_is_the_mean_over_all_regressed_positions(tmp_path):
    """Not a mean of batch means: every batch counts by its sample size, as in training."""
    os.chdir(ROOT)
    name, extra = CASES["data2vec 2.0 audio"]
    runner = Run(_spec(name, [*extra, "data.valid.max_examples=7"], tmp_path / "run"))
    try:
        torch.manual_seed(0)
        reported = runner.evaluate_split("valid")["loss"]
        torch.manual_seed(0)  # the same masks (drawn in forward: evaluation batches are not transformed)
        model = runner.model.eval()
        with torch.no_grad():
            outputs = [model(batch) for batch in runner.eval_loader("valid")]
    finally:
        runner.release()
    sizes = [out.sample_size for out in outputs]
    assert len(set(sizes)) > 1  # batches of different sizes: the two means differ
    true_mean = sum(float(out.loss) * n for out, n in zip(outputs, sizes)) / sum(sizes)
    mean_of_means = sum(float(out.loss) for out in outputs) / len(outputs)
    assert reported == pytest.approx(true_mean, rel=1e-6)
    assert abs(mean_of_means - true_mean) > 1e-4 * abs(true_mean)
