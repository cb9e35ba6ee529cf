"""Speech fixtures made by fairseq's own data2vec code (run through ``make_fixtures.py``).

Families (``fixtures/<name>/``):

* ``audio1``: data2vec 1.0 pretraining (``data2vec_audio``, post-LN as released);
* ``audio1_preln``: the same with ``layer_norm_first: true`` (d2v must refuse it by name);
* ``audio1_ctc``: ``wav2vec_ctc`` fine-tuned from ``audio1`` (``audio_finetuning``, 32 letters);
* ``audio2``: data2vec 2.0 (``data2vec_multi``, AUDIO) with ALiBi, a learned scale per head;
* ``audio2_layer_scale``: a prenet block, a learned ALiBi scale per layer shared by the heads, and
  an EMA teacher of the shared blocks only (``ema_encoder_only``);
* ``audio2_preln``: ``layer_norm_first: true`` (d2v must refuse it by name);
* ``audio2_ctc``: ``wav2vec_ctc`` fine-tuned from a 2.0 model with one ALiBi scale for all layers
  and heads (``audio2``'s shape otherwise);
* ``audio_alibi``: fairseq's ALiBi slopes and biases (``outputs.pt`` only).

Every weight is randomised (LayerNorm gains and biases too) so a misplaced tensor shows;
``audio1`` and ``audio2`` train two updates through fairseq's ``Trainer`` (Adam state, EMA
teacher; the variants are saved untrained, to stay small) and the EMA teacher is then moved away
from the student, as after a long run. Everything is seeded: a rerun writes the same tensors.
``outputs.pt`` holds:

* ``source``/``padding_mask``: a padded batch; ``hidden`` (pretraining) or ``logits`` (CTC):
  fairseq's output on it in eval mode, ``hidden_padding_mask`` its frame-rate padding;
* pretraining, for the next update (train mode, every dropout 0, an unpadded batch as
  fairseq's pretraining crops its batches): ``update_source``, the mask fairseq used
  (``update_mask``; 2.0: ``(B * clone_batch, T)``, given to fairseq as ``precomputed_mask``),
  ``targets`` and ``predictions`` at the masked frames, the criterion's ``loss`` (a sum) and
  ``sample_size`` (fairseq's update divides the one by the other); then the trainer's
  ``set_num_updates``: ``ema_step``, the annealed ``ema_decay`` and a few teacher tensors after
  that EMA step (``teacher_after``, fairseq's names).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

import oracle_trainer as ot

DIM, FFN, HEADS, LAYERS = 32, 32, 4, 2
CONV = "[(8, 10, 5)] + [(8, 3, 2)] * 2"
LETTERS = "| E T A O N I H S R D L U M W C F G Y P B V K ' X J Q Z".split()
NO_DROPOUT_1 = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.0,
                "dropout_input": 0.0, "dropout_features": 0.0}


def _seed(seed: int) -> None:
    """torch's and NumPy's generators (fairseq draws its training masks with NumPy)."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Every parameter perturbed (norm gains around 1), so no weight keeps a constant init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _move_teacher(model, seed: int) -> None:
    """Perturb fairseq's EMA teacher (model and its fp32 copy, which is what gets saved)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in model.ema.model.state_dict().items()}
    model.ema.restore(state, build_fp32_params=True)


def _batches(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([800, 600, 400])
    source = torch.randn(3, 800, generator=g)
    padding = torch.arange(800)[None, :] >= lengths[:, None]
    return {"source": source.masked_fill(padding, 0.0), "padding_mask": padding,
            "update_source": torch.randn(2, 640, generator=g)}


def _train_two_steps(trainer, source: torch.Tensor, masks: dict) -> None:
    """Two updates with fixed masks (``masks``: the model's mask argument): fairseq draws unseeded
    masks from fresh OS entropy, which would make every regeneration differ."""
    sample = {"id": torch.arange(source.shape[0]), "net_input": {"source": source, "padding_mask": None, **masks}}
    for _ in range(2):
        trainer.train_step([sample])


def _span_mask(rows: int, frames: int, prob: float, seed: int) -> torch.Tensor:
    """fairseq's own span mask (length 3, the same count in every row), seeded."""
    from fairseq.data.data_utils import compute_mask_indices

    return torch.from_numpy(compute_mask_indices((rows, frames), None, prob, 3, min_masks=1, require_same_masks=True,
                                                 seed=seed, epoch=1, indices=torch.arange(rows)))


def _mask_1(model, source: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.no_grad():
        frames = model.feature_extractor(source).shape[-1]
    return _span_mask(source.shape[0], frames, 0.65, seed)


def _mask_2(model, source: torch.Tensor, seed: int) -> torch.Tensor:
    """``(B * clone_batch, T)``: the rows of each example's clones, as fairseq repeats them."""
    with torch.no_grad():
        frames = model.modality_encoders["AUDIO"].local_features(source).shape[1]
    return _span_mask(source.shape[0] * model.cfg.clone_batch, frames, 0.5, seed)


def _save(out: Path, trainer, outputs: dict) -> None:
    ot.save(trainer, str(out / "checkpoint.pt"))
    torch.save(outputs, out / "outputs.pt")


# --------------------------------------------------------------------------- data2vec 1.0


def _audio1_cfg(**overrides):
    model = {"encoder_layers": LAYERS, "encoder_embed_dim": DIM, "encoder_ffn_embed_dim": FFN,
             "encoder_attention_heads": HEADS, "conv_feature_layers": CONV, "conv_pos": 10, "conv_pos_groups": 8,
             "pos_conv_depth": 2, "extractor_mode": "layer_norm", "layer_norm_first": False,
             "average_top_k_layers": 2, "instance_norm_target_layer": True, "mask_prob": 0.65, "mask_length": 3,
             "ema_decay": 0.999, "ema_end_decay": 0.9999, "ema_anneal_end_step": 1000, **NO_DROPOUT_1, **overrides}
    return ot.fairseq_config("audio_pretraining", {"data": "/tmp", "normalize": True}, "data2vec_audio", model)


def _audio1_model(seed: int, trained: bool, **overrides):
    _seed(seed)
    task, model, criterion, trainer = ot.build(_audio1_cfg(**overrides))
    _randomise(model, seed)
    batches = _batches(seed)
    if trained:
        source = batches["update_source"]
        _train_two_steps(trainer, source, {"mask_indices": _mask_1(model, source, seed)})
        _move_teacher(model, seed + 1)
    return model, criterion, trainer, batches


def _audio1_hidden(model, batches: dict) -> dict:
    model.eval()
    with torch.no_grad():
        res = model.extract_features(batches["source"], batches["padding_mask"], mask=False)
    return {"hidden": res["x"], "hidden_padding_mask": res["padding_mask"]}


def audio1(out: Path, **overrides) -> Path:
    """The released shape; with ``overrides`` a variant saved untrained (smaller: no Adam state,
    no EMA teacher) and without the update."""
    model, criterion, trainer, batches = _audio1_model(11, not overrides, **overrides)
    outputs = {**batches, **_audio1_hidden(model, batches)}
    ot.save(trainer, str(out / "checkpoint.pt"))  # before the EMA step below moves the teacher
    if not overrides:
        outputs.update(_audio1_update(model, criterion, batches["update_source"]))
        outputs.update(_ema_step(model, trainer.get_num_updates() + 1, EMA_KEYS_1))
    torch.save(outputs, out / "outputs.pt")
    return out / "checkpoint.pt"


def _audio1_update(model, criterion, source: torch.Tensor) -> dict:
    """The next update's loss under a fixed span mask (``mask_indices``), with the targets and
    predictions fairseq's forward hands to ``compute_var`` (targets first)."""
    mask = _mask_1(model, source, seed=5)
    seen = []
    compute_var = model.compute_var
    model.compute_var = lambda y: seen.append(y.detach().clone()) or compute_var(y)
    model.train()
    sample = {"id": torch.arange(source.shape[0]),
              "net_input": {"source": source, "padding_mask": None, "mask_indices": mask}}
    with torch.no_grad():
        loss, sample_size, _ = criterion(model, sample)
    del model.compute_var
    return {"update_mask": mask, "targets": seen[0], "predictions": seen[1], "loss": float(loss),
            "sample_size": int(sample_size)}


#: teacher tensors recorded after the EMA step, by fairseq's EMA names: data2vec 1.0 (the encoder;
#: its positional conv is copied, not averaged), 2.0 (the model), 2.0 ``ema_encoder_only`` (the blocks)
EMA_KEYS_1 = ("pos_conv.0.0.weight", "layers.1.fc1.weight", "layers.0.self_attn_layer_norm.weight")
EMA_KEYS_2 = ("blocks.1.mlp.fc1.weight", "modality_encoders.AUDIO.alibi_scale",
              "modality_encoders.AUDIO.relative_positional_encoder.1.0.weight",
              "modality_encoders.AUDIO.context_encoder.norm.weight")
EMA_KEYS_2_BLOCKS = ("1.mlp.fc1.weight", "0.norm1.weight")


def _ema_step(model, step: int, keys: tuple[str, ...]) -> dict:
    """What the trainer does after that update: ``set_num_updates(step)`` anneals the decay and
    moves the EMA teacher towards the (here unchanged) student."""
    model.train()
    model.set_num_updates(step)
    state = model.ema.model.state_dict()
    return {"ema_step": step, "ema_decay": float(model.ema.get_decay()),
            "teacher_after": {key: state[key].detach().clone() for key in keys}}


def audio1_preln(out: Path) -> Path:
    return audio1(out, layer_norm_first=True)


def _letters_dir() -> str:
    folder = tempfile.mkdtemp(prefix="fairseq_ltr_")
    Path(folder, "dict.ltr.txt").write_text("".join(f"{s} {1000 - i}\n" for i, s in enumerate(LETTERS)))
    return folder


def _ctc(out: Path, pretrained: Path, seed: int, **overrides) -> None:
    """``wav2vec_ctc`` built from a pretrained fixture (fairseq reads it through ``w2v_path``)."""
    data = _letters_dir()
    model_args = {"w2v_path": str(pretrained), "apply_mask": True, "mask_prob": 0.5, "mask_channel_prob": 0.1,
                  "mask_channel_length": 8, "layerdrop": 0.1, "dropout": 0.0, "attention_dropout": 0.0,
                  "activation_dropout": 0.1, "final_dropout": 0.0, "feature_grad_mult": 0.0, "normalize": True,
                  **overrides}
    cfg = ot.fairseq_config("audio_finetuning", {"data": data, "labels": "ltr", "normalize": True}, "wav2vec_ctc",
                            model_args, criterion="ctc", criterion_args={"zero_infinity": True})
    _seed(seed)
    task, model, criterion, trainer = ot.build(cfg)
    _randomise(model.w2v_encoder.proj, seed)
    batches = _batches(seed)
    model.eval()
    with torch.no_grad():
        res = model(source=batches["source"], padding_mask=batches["padding_mask"])
    pad = res["padding_mask"]
    _save(out, trainer, {"source": batches["source"], "padding_mask": batches["padding_mask"],
                         "logits": res["encoder_out"].transpose(0, 1).contiguous(),
                         "hidden_padding_mask": pad if pad is not None else torch.zeros(0)})


def audio1_ctc(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _ctc(out, audio1(Path(tmp)), seed=13)


# --------------------------------------------------------------------------- data2vec 2.0


def _audio2_cfg(model_overrides: dict, **audio):
    modality = {"prenet_depth": 0, "feature_encoder_spec": CONV, "conv_pos_width": 10, "conv_pos_depth": 2,
                "conv_pos_groups": 8, "use_alibi_encoder": True, "learned_alibi_scale": True,
                "learned_alibi_scale_per_head": True, "alibi_scale": 1.0, "mask_prob": 0.5, "mask_length": 3,
                "mask_noise_std": 0.0, "prenet_dropout": 0.0, "prenet_layerdrop": 0.0,
                "decoder.decoder_dim": 16, "decoder.decoder_groups": 4, "decoder.decoder_kernel": 5,
                "decoder.decoder_layers": 2, "decoder.input_dropout": 0.0, **audio}
    model = {"embed_dim": DIM, "depth": LAYERS, "num_heads": HEADS, "mlp_ratio": 1.0, "encoder_dropout": 0.0,
             "attention_dropout": 0.0, "activation_dropout": 0.0, "post_mlp_drop": 0.0, "layerdrop": 0.0,
             "dropout_input": 0.0, "average_top_k_layers": 2, "instance_norm_target_layer": True,
             "clone_batch": 2, "ema_decay": 0.999, "ema_end_decay": 0.99999, "ema_anneal_end_step": 1000,
             "ema_encoder_only": False, "supported_modality": "AUDIO",
             **{f"modalities.audio.{key}": value for key, value in modality.items()}, **model_overrides}
    return ot.fairseq_config("audio_pretraining", {"data": "/tmp", "normalize": True}, "data2vec_multi", model)


def audio2(out: Path, model_overrides: dict | None = None, **audio) -> Path:
    """The base recipe's shape; with overrides (of ``cfg.model`` or its audio modality) a
    variant saved untrained (no Adam state; the EMA teacher, which 2.0 builds with the model, is
    still moved away), the update recorded unless the variant is one d2v refuses (pre-LN)."""
    seed = 21
    model_overrides = model_overrides or {}
    _seed(seed)
    task, model, criterion, trainer = ot.build(_audio2_cfg(model_overrides, **audio))
    _randomise(model, seed)
    with torch.no_grad():  # a learned ALiBi scale with negative entries exercises fairseq's clamp
        scale = model.modality_encoders["AUDIO"].alibi_scale
        scale.copy_(torch.linspace(-0.2, 1.5, scale.numel()).reshape(scale.shape))
    batches = _batches(seed)
    if not audio and not model_overrides:
        source = batches["update_source"]
        _train_two_steps(trainer, source, {"precomputed_mask": _mask_2(model, source, seed)})
    _move_teacher(model, seed + 1)

    model.eval()
    with torch.no_grad():
        res = model(batches["source"], padding_mask=batches["padding_mask"], mask=False, features_only=True)
    pad = res["padding_mask"]
    outputs = {**batches, "hidden": res["x"], "hidden_padding_mask": pad if pad is not None else torch.zeros(0)}
    ot.save(trainer, str(out / "checkpoint.pt"))  # before the EMA step below moves the teacher
    if not model_overrides.get("layer_norm_first"):
        outputs.update(_audio2_update(model, criterion, batches["update_source"]))
        keys = EMA_KEYS_2_BLOCKS if model_overrides.get("ema_encoder_only") else EMA_KEYS_2
        outputs.update(_ema_step(model, trainer.get_num_updates() + 1, keys))
    torch.save(outputs, out / "outputs.pt")
    return out / "checkpoint.pt"


def _audio2_update(model, criterion, source: torch.Tensor) -> dict:
    """The next update with ``clone_batch`` masks per example given as ``precomputed_mask``;
    the decoder's predictions and the targets are read off ``d2v_loss`` (fairseq's loss call)."""
    clones = model.cfg.clone_batch
    mask = _mask_2(model, source, seed=7)
    seen = []
    d2v_loss = model.d2v_loss
    model.d2v_loss = lambda x, y: seen.append((x.detach().clone(), y.detach().clone())) or d2v_loss(x, y)
    model.train()
    sample = {"id": torch.arange(source.shape[0]),
              "net_input": {"source": source, "padding_mask": None, "precomputed_mask": mask}}
    with torch.no_grad():
        loss, sample_size, _ = criterion(model, sample)
    del model.d2v_loss
    (predictions, targets), = seen
    return {"update_mask": mask, "targets": targets, "predictions": predictions, "loss": float(loss),
            "sample_size": int(sample_size), "clone_batch": clones}


def audio2_layer_scale(out: Path) -> Path:
    """A prenet block and one ALiBi scale per layer shared by the heads (fairseq splits the
    per-layer scales between prenet and shared blocks), and an EMA of the shared blocks only
    (``ema_encoder_only``: the teacher runs the student's prenet, positional conv and scales)."""
    return audio2(out, {"ema_encoder_only": True}, prenet_depth=1, learned_alibi_scale_per_head=False,
                  learned_alibi_scale_per_layer=True)


def audio2_preln(out: Path) -> Path:
    return audio2(out, {"layer_norm_first": True})


def audio2_ctc(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _ctc(out, audio2(Path(tmp), learned_alibi_scale_per_head=False), seed=23, update_alibi=False, zero_mask=False)


# --------------------------------------------------------------------------- ALiBi


def audio_alibi(out: Path) -> None:
    """fairseq's ``get_alibi`` itself: the slopes for 1..64 heads (``-bias[h, 0, 1]`` of a
    two-position bias) and whole biases, 1-D for 4, 8, 12 and 16 heads over 9 positions and 2-D
    (Manhattan distance on a 3x3 grid) for 4 heads."""
    from examples.data2vec.models.modalities.base import get_alibi

    outputs = {f"slopes_{heads}": -get_alibi(2, heads)[:, 0, 1] for heads in range(1, 65)}
    outputs.update({f"bias_1d_{heads}": get_alibi(9, heads) for heads in (4, 8, 12, 16)})
    outputs["bias_2d_4"] = get_alibi(9, 4, dims=2)
    torch.save(outputs, out / "outputs.pt")


FAMILIES = {
    "audio1": audio1,
    "audio1_preln": audio1_preln,
    "audio1_ctc": audio1_ctc,
    "audio2": audio2,
    "audio2_layer_scale": audio2_layer_scale,
    "audio2_preln": audio2_preln,
    "audio2_ctc": audio2_ctc,
    "audio_alibi": audio_alibi,
}
