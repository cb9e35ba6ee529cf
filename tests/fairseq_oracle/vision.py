"""data2vec 2.0 image families, produced by fairseq's own code (run through make_fixtures.py).

* ``vision2``: ``data2vec_multi`` with the IMAGE modality under ``mae_image_pretraining``, shaped
  like ``config/v2/base_images_only_task.yaml`` (post-LN blocks, prenet, CLS token and CLS loss,
  inverse block masks, EMA over the patch embedding too, ``Decoder2d``) but 32 wide.
* ``vision2_prenorm``: the same with ``layer_norm_first: true`` (fairseq's pre-LN ``AltBlock``),
  ``ema_local_encoder: false`` (the teacher averages all but the patch embedding, the student's)
  and a smooth L1 loss (``loss_beta`` 0.25).
* ``vision2_ema_blocks``: ``ema_encoder_only: true`` (the teacher averages the shared blocks only),
  a patch embedding narrower than the model (modality ``embed_dim`` 24, then a Linear), and the
  other target options: end-of-block targets, layer norm per block, instance norm on the average.
* ``vision2_cls``: ``mae_image_classification`` fine-tuned from a ``vision2``-shaped checkpoint, as
  fairseq's image classification task saves it (the backbone config copied into
  ``cfg.model.pretrained_model_args``); mean pooling + ``fc_norm`` as released.
* ``vision2_cls_token``: the same classifier with ``prediction_mode: CLS_TOKEN`` and no ``fc_norm``.

Every checkpoint is written by ``Trainer.save_checkpoint`` after two real updates (so there is an
EMA teacher and an update count), with ``checkpoint.no_save_optimizer_state`` (an option fairseq
users set; d2v never reads the optimizer state, and Adam's would triple the file).

``outputs.pt`` holds what fairseq computed on fixed images: the encoder output in eval mode, and
for pretraining checkpoints the next update on a fixed mask (fairseq's own 2-D block masking,
seeded, fed as ``precomputed_mask`` as its image dataset does): teacher targets, decoder
predictions at the masked patches, loss and sample size, all read off fairseq's forward. The
decoder's noise at masked patches comes from torch's RNG, seeded with ``noise_seed`` just before
the forward.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

import oracle_trainer as ot

BATCH, CLONES, NOISE_SEED = 2, 2, 1234

# config/v2/base_images_only_task.yaml, narrowed (32 wide, 1 prenet + 2 blocks, 32 px images, 8 px patches),
# with a fast EMA and large steps so that after two updates student and teacher differ clearly
IMAGE = {
    "input_size": 32, "patch_size": 8, "embed_dim": 32, "prenet_depth": 1, "inverse_mask": True, "mask_prob": 0.8,
    "mask_prob_adjust": 0.07, "mask_length": 3, "mask_noise_std": 0.01, "ema_local_encoder": True,
    "num_extra_tokens": 1, "init_extra_token_zero": False, "use_alibi_encoder": False,
    "decoder.decoder_dim": 16, "decoder.decoder_groups": 16, "decoder.decoder_kernel": 3, "decoder.decoder_layers": 2,
    "decoder.input_dropout": 0.0,
}
MODEL = {
    "depth": 2, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2.0, "average_top_k_layers": 2, "clone_batch": CLONES,
    "instance_norm_target_layer": True, "layer_norm_target_layer": False, "layer_norm_targets": True,
    "end_of_block_targets": False, "ema_decay": 0.9, "ema_end_decay": 0.99, "ema_anneal_end_step": 100,
    "norm_eps": 1e-6, "min_target_var": 0.0, "min_pred_var": 0.0, "encoder_dropout": 0.0, "post_mlp_drop": 0.0,
    "attention_dropout": 0.0, "activation_dropout": 0.0, "supported_modality": "IMAGE", "cls_loss": 0.01,
    "ema_encoder_only": False,
}


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE["input_size"], IMAGE["input_size"], generator=torch.Generator().manual_seed(seed))


def trained(cfg, samples: list[dict]):
    """(model, criterion, trainer) after one update per sample, seeded as ``fairseq_cli.train``
    seeds before building (so a family does not depend on what ran before it)."""
    from fairseq import utils

    cfg.checkpoint.no_save_optimizer_state = True
    cfg.lr_scheduler.init_lr_scale = 1.0  # full steps from the first update: the student leaves its EMA behind
    np.random.seed(cfg.common.seed)
    utils.set_torch_seed(cfg.common.seed)
    _, model, criterion, trainer = ot.build(cfg)
    for sample in samples:
        trainer.train_step([sample])
    return model, criterion, trainer


def pretraining(data: str, overrides: dict):
    model_args = {**MODEL, **{f"modalities.image.{k}": v for k, v in IMAGE.items()}, **overrides}
    cfg = ot.fairseq_config("mae_image_pretraining", {"data": data, "input_size": IMAGE["input_size"]},
                            "data2vec_multi", model_args, lr=1e-2, seed=1)
    samples = [{"id": torch.arange(BATCH), "net_input": {"source": images(BATCH, seed)}} for seed in (10, 11)]
    return trained(cfg, samples)


def block_masks(rows: int, patches: int, seed: int) -> torch.Tensor:
    """``(rows, patches)`` masks (1 = masked) from fairseq's ``compute_block_mask_2d`` with the
    modality's settings, as ``MaeImageDataset`` precomputes them."""
    from fairseq.data.data_utils import compute_block_mask_2d

    torch.manual_seed(seed)
    return compute_block_mask_2d(shape=(rows, patches), mask_prob=IMAGE["mask_prob"], mask_length=IMAGE["mask_length"],
                                 mask_prob_adjust=IMAGE["mask_prob_adjust"], inverse_mask=IMAGE["inverse_mask"],
                                 require_same_masks=True)


def next_update(model, criterion, x: torch.Tensor, mask: torch.Tensor) -> dict:
    """The loss of the update after the checkpoint (train mode; every dropout is 0), with the
    targets and decoder predictions fairseq's forward made on the way."""
    seen = {}
    make_targets, forward_decoder = model.make_targets, model.forward_decoder

    def recording_targets(layers, top_k):
        seen["targets"] = make_targets(layers, top_k).clone()
        return seen["targets"].clone()

    def recording_decoder(*args):
        seen["decoded"] = forward_decoder(*args)
        return seen["decoded"]

    model.make_targets, model.forward_decoder = recording_targets, recording_decoder
    model.train()
    sample = {"id": torch.arange(len(x)), "net_input": {"source": x, "precomputed_mask": mask}}
    torch.manual_seed(NOISE_SEED)
    loss, sample_size, logs = criterion(model, sample)
    del model.make_targets, model.forward_decoder
    return {
        "mask": mask.bool(), "noise_seed": NOISE_SEED, "targets": seen["targets"],
        "predictions": seen["decoded"].detach()[mask.bool()], "loss": loss.item(), "sample_size": int(sample_size),
        "loss_cls": float(logs["loss_cls"]), "loss_regression": float(logs["loss_IMAGE_regression"]),
        "next_ema_decay": next_ema_decay(model),
    }


def next_ema_decay(model) -> float:
    """The decay of the EMA step after the next update: fairseq's ``train_step`` for update
    ``n + 1`` calls ``set_num_updates(n + 1)``, which steps the EMA with that decay."""
    from examples.data2vec.models.modalities.base import get_annealed_rate

    cfg = model.cfg
    return float(get_annealed_rate(cfg.ema_decay, cfg.ema_end_decay, model.num_updates + 1, cfg.ema_anneal_end_step))


@torch.no_grad()
def encoder_outputs(model, x: torch.Tensor) -> dict:
    """Eval-mode outputs (CLS token kept) and each shared block's target feature (its FFN output,
    or its output with ``end_of_block_targets``)."""
    model.eval()
    out = model.extract_features(x, mode="IMAGE", mask=False, remove_extra_tokens=False)
    return {"encoder_out": out["x"], "layer_ffn": torch.stack(out["layer_results"])}


def resumed(cfg, path: Path):
    """(model, criterion) of a fresh ``Trainer`` that loaded ``path``: continued pretraining as
    ``fairseq-hydra-train`` resumes it (the model's update count is the file's, with no EMA step)."""
    _, model, criterion, trainer = ot.build(cfg)
    trainer.load_checkpoint(str(path))
    return model, criterion


def write_pretraining(out: Path, overrides: dict) -> None:
    with tempfile.TemporaryDirectory() as data:
        _, _, trainer = pretraining(data, overrides)
        ot.save(trainer, str(out / "checkpoint.pt"))
        model, criterion = resumed(trainer.cfg, out / "checkpoint.pt")
    assert model.num_updates == 2
    x = images(BATCH, seed=0)
    recorded = {"images": x, "num_updates": 2, **encoder_outputs(model, x)}
    teacher = model.ema.model
    if not model.cfg.ema_encoder_only and teacher.modality_encoders["IMAGE"].local_encoder is not None:
        # a whole model of its own (else the teacher runs parts of the student)
        recorded["teacher_encoder_out"] = encoder_outputs(teacher, x)["encoder_out"]
    patches = (IMAGE["input_size"] // IMAGE["patch_size"]) ** 2
    recorded.update(next_update(model, criterion, x, block_masks(BATCH * CLONES, patches, seed=5)))
    torch.save(recorded, out / "outputs.pt")


def write_classifier(out: Path, head: dict) -> None:
    with tempfile.TemporaryDirectory() as data:
        _, _, pretrainer = pretraining(data, {})
        backbone = Path(data) / "pretrained.pt"
        ot.save(pretrainer, str(backbone))
        cfg = ot.fairseq_config("mae_image_classification", {"data": data, "input_size": IMAGE["input_size"]},
                                "mae_image_classification",
                                {"model_path": str(backbone), "num_classes": 5, "mixup": 0.0, "cutmix": 0.0, **head},
                                lr=1e-2, seed=1)
        labels = torch.tensor([0, 3, 4, 1])
        samples = [{"id": torch.arange(4), "net_input": {"imgs": images(4, seed), "labels": labels}} for seed in (20, 21)]
        model, criterion, trainer = trained(cfg, samples)
        ot.save(trainer, str(out / "checkpoint.pt"))
    x, labels = images(BATCH, seed=0), torch.tensor([4, 1])
    model.eval()
    with torch.no_grad():
        logits = model(x)
        backbone = model.model.extract_features(x, mode="IMAGE", mask=False, remove_extra_tokens=False)["x"]
        loss, sample_size, _ = criterion(model, {"id": torch.arange(BATCH), "net_input": {"imgs": x, "labels": labels}})
    torch.save({"images": x, "logits": logits, "encoder_out": backbone, "num_updates": 2, "labels": labels,
                "eval_loss": loss.item(), "sample_size": int(sample_size)}, out / "outputs.pt")


FAMILIES = {
    "vision2": lambda out: write_pretraining(out, {}),
    # pre-LN blocks, a teacher that runs the student's patch embedding (no ema_local_encoder), smooth L1
    "vision2_prenorm": lambda out: write_pretraining(out, {"layer_norm_first": True, "loss_beta": 0.25,
                                                           "modalities.image.ema_local_encoder": False}),
    # EMA of the shared blocks only, a patch embedding narrower than the model (+ a Linear), targets
    # taken at the end of each block, layer-normed per block and instance-normed on average
    "vision2_ema_blocks": lambda out: write_pretraining(out, {
        "ema_encoder_only": True, "modalities.image.embed_dim": 24, "end_of_block_targets": True,
        "instance_norm_target_layer": False, "layer_norm_target_layer": True, "layer_norm_targets": False,
        "instance_norm_targets": True}),
    "vision2_cls": lambda out: write_classifier(out, {"prediction_mode": "MEAN_POOLING", "use_fc_norm": True}),
    "vision2_cls_token": lambda out: write_classifier(out, {"prediction_mode": "CLS_TOKEN", "use_fc_norm": False}),
}
