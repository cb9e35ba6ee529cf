"""``trainer.gradient_checkpointing`` and ``trainer.compile``: the same numbers, less memory kept
for backward, for every built-in encoder (and through a whole pretraining run)."""

from __future__ import annotations

import pytest
import torch

from d2v.api import plugins
from d2v.api.errors import SpecError
from d2v.spec.model import build_model
from d2v.nn.layer_options import apply_layer_options


def _padding(lengths, width):
    return torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]


def _audio():
    waves = torch.randn(3, 4000)
    return "data2vec-audio-tiny", {}, {"inputs": waves, "padding_mask": _padding([4000, 3100, 1700], 4000)}


def _text():
    ids = torch.randint(5, 1000, (3, 24))
    return "data2vec-text-tiny", {}, {"inputs": ids, "padding_mask": _padding([24, 17, 9], 24)}


def _vision():
    return "data2vec-vision-tiny", {}, {"inputs": torch.randn(2, 3, 32, 32)}


def _vit():
    return "data2vec2-vision-tiny", {}, {"inputs": torch.randn(2, 3, 32, 32)}


MODELS = {"audio": _audio, "text": _text, "vision": _vision, "vit": _vit}


def _build(preset: str, encoder: dict):
    torch.manual_seed(0)
    return build_model({"preset": preset, "encoder": {"dropout": 0.1, **encoder}}, plugins.registry(), "finetune")


def _loss_and_grads(model, batch, *, seed: int = 3):
    """A loss over the last hidden state (every block contributes), with dropout on; and the
    bytes the encoder keeps for backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    features = model.feature_extractor(batch["inputs"], batch.get("padding_mask"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.encoder(features.features, features.padding_mask, **(features.encoder_context or {}))
        loss = out.last_hidden_state.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, sum(saved)


@pytest.mark.parametrize("modality", sorted(MODELS))
def test_gradient_checkpointing_keeps_numbers_and_saves_activation_memory(modality):
    preset, encoder, batch = MODELS[modality]()
    plain = _build(preset, encoder)
    loss, grads, saved = _loss_and_grads(plain, batch)
    checkpointed = _build(preset, encoder)
    assert apply_layer_options(checkpointed, gradient_checkpointing=True)
    ck_loss, ck_grads, ck_saved = _loss_and_grads(checkpointed, batch)
    assert ck_loss == pytest.approx(loss, rel=1e-6)  # dropout masks are replayed exactly
    assert grads.keys() == ck_grads.keys()
    for name in grads:
        torch.testing.assert_close(ck_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
    # activations kept for backward: the blocks' inputs instead of everything inside them
    assert ck_saved < 0.6 * saved, (ck_saved, saved)
    with torch.no_grad():  # evaluation is untouched
        plain.eval(), checkpointed.eval()
        torch.testing.assert_close(checkpointed(batch).last_hidden_state, plain(batch).last_hidden_state)


@pytest.mark.parametrize("modality", ["text"])  # the one with keyword arguments and a cache; others: benchmarks/run.py --compile
def test_compiled_blocks_give_the_same_outputs_and_gradients(modality):
    """``aot_eager`` runs dynamo and AOT autograd (what can break a model) without a C++ build."""
    preset, encoder, batch = MODELS[modality]()
    eager = _build(preset, {**encoder, "dropout": 0.0})
    compiled = _build(preset, {**encoder, "dropout": 0.0})
    torch._dynamo.reset()
    done = apply_layer_options(compiled, compile={"backend": "aot_eager", "dynamic": True})
    assert "torch.compile" in done[0]
    loss, grads, _ = _loss_and_grads(eager, batch)
    c_loss, c_grads, _ = _loss_and_grads(compiled, batch)
    assert c_loss == pytest.approx(loss, rel=1e-5)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # in place: checkpoints unchanged


def test_an_encoder_without_a_layer_list_is_a_clear_error():
    import toy

    model = toy.ToyEncoder(dim=8, layers=2)
    model.layers = None
    with pytest.raises(SpecError, match="self.layers"):
        apply_layer_options(model, gradient_checkpointing=True)


def test_a_spec_turns_checkpointing_on_and_training_is_unchanged(tmp_path, monkeypatch, capsys):
    """``trainer.gradient_checkpointing: true`` from a spec: the runner says so and the logged
    training losses equal the run without it (dropout replayed exactly)."""
    import json
    from pathlib import Path

    from d2v.spec.config import load_spec
    from d2v.train import run

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    losses = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        run(load_spec(root / "experiments" / "asr_demo.yaml",
                      [f"trainer.output_dir={out}", "trainer.max_steps=3", "trainer.log_every=1",
                       "trainer.eval_every=0", "trainer.eval_before_training=false", "trainer.progress_bar=false",
                       "data.train.max_examples=16", "data.valid.max_examples=4", "data.loader.max_batch_seconds=8",
                       f"trainer.gradient_checkpointing={flag}"]))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in records if r.get("split") == "train"]
        assert ("activation checkpointing in 2 Transformer blocks" in capsys.readouterr().out) == (flag == "true")
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
