"""fairseq data2vec 2.0 image checkpoints -> d2v (``d2v convert x.pt OUT``, ``model.init.checkpoint: x.pt``).

Two ``fairseq_converter`` components:

* ``data2vec_multi_image``: a pretraining checkpoint (``cfg.model._name: data2vec_multi`` with
  ``modality_encoders.IMAGE.*``) -> a ``pretrain`` spec with the ``data2vec2`` objective:
  student, ``Decoder2d`` (``modality_encoders.IMAGE.decoder.*`` -> ``decoder.*``) and the EMA
  teacher (``_ema``; with ``ema_local_encoder`` it holds the patch embedding too).
* ``mae_image_classification``: a fine-tuned classifier over ``data2vec_multi`` (``model.*``,
  ``fc_norm``, ``head``) -> a ``finetune`` spec with the ``image_classification`` head (the
  encoder's ``pooler_norm`` is fairseq's ``fc_norm``).

Name map (fairseq ``modality_encoders.IMAGE.`` prefix = ``M.``)::

    M.local_encoder.proj             feature_extractor.projection     (M.local_encoder.0.proj, .1 ->
    M.fixed_positional_encoder.positions  feature_extractor.positions   projection, patch_projection)
    M.extra_tokens                   feature_extractor.extra_tokens
    M.context_encoder.norm           encoder.layer_norm
    M.context_encoder.blocks.<i>     encoder.layers.<i>
    blocks.<j>                       encoder.layers.<prenet + j>     (attn -> attention)
    norm                             encoder.norm                    (layer_norm_first models)
    M.decoder.blocks.<i>.0 / .proj   decoder.blocks.<i>.conv / decoder.proj

Older checkpoints name the positions ``positional_encoder.pos_embed`` (fairseq renames them to
``positions`` when fine-tuning) and may carry ``modality_encoders.IMAGE.encoder_mask``, which
fairseq drops; both are handled the same way here.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from d2v.api.errors import SpecError
from d2v.interop.fairseq import ConfigReader, FairseqCheckpoint, FairseqImport
from d2v.interop.fairseq_multi import (DECODER_FIELDS, MODALITY_FIELDS, MULTI_FIELDS, decoder_names, encoder_blocks,
                                       ema_holds_blocks_only, objective)
from d2v.interop.fairseq_names import Rename, collect, collect_ema, linear, prefixed, rebased

M = "modality_encoders.IMAGE."
POSITION_NAMES = ("fixed_positional_encoder.positions", "positional_encoder.positions", "positional_encoder.pos_embed")
DROPPED = ("encoder_mask",)

# D2vImageConfig's own fields (modalities/images.py); the shared ones are in d2v.interop.fairseq_multi
IMAGE_FIELDS = MODALITY_FIELDS + (
    "input_size", "in_chans", "patch_size", "embed_dim", "alibi_dims", "alibi_distance", "fixed_positions",
    "transformer_decoder", "enc_dec_transformer",
)
CLASSIFIER_FIELDS = (
    "model_path", "no_pretrained_weights", "linear_classifier", "num_classes", "mixup", "cutmix", "label_smoothing",
    "drop_path_rate", "layer_decay", "mixup_prob", "mixup_switch_prob", "mixup_mode", "pretrained_model_args", "data",
    "norm_eps", "remove_alibi", "encoder_dropout", "post_mlp_drop", "attention_dropout", "activation_dropout",
    "dropout_input", "layerdrop", "prenet_layerdrop", "prenet_dropout", "use_fc_norm", "prediction_mode",
    "no_decay_blocks",
)
#: the ``vision.vit_transformer`` module of each ``AltBlock`` part (the fused qkv stays fused)
BLOCK = {"norm1": "norm1", "attn.qkv": "attention.qkv", "attn.proj": "attention.proj", "norm2": "norm2",
         "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


# --------------------------------------------------------------------------- the architecture


class ImageConfig:
    """The parts of a ``data2vec_multi`` config that shape the image backbone, read once."""

    def __init__(self, model: ConfigReader, overrides: dict[str, Any] | None = None):
        over = overrides or {}
        self.model = model
        modalities = model.section("modalities", known=("audio", "image", "text", "_name"))
        self.image = image = modalities.section("image", known=IMAGE_FIELDS)
        self.decoder = image.section("decoder", known=DECODER_FIELDS)
        self.depth = int(model.get("depth", 8))
        self.dim = int(model.get("embed_dim", 768))
        self.heads = int(model.get("num_heads", 12))
        if self.heads < 1 or self.dim % self.heads:
            raise SpecError(f"{model.where}.num_heads {self.heads} does not divide {model.where}.embed_dim {self.dim}: "
                            f"the config is not one fairseq could have trained.")
        self.mlp_ratio = float(model.get("mlp_ratio", 4.0))
        self.norm_eps = float(over.get("norm_eps") if over.get("norm_eps") is not None else model.get("norm_eps", 1e-6))
        self.layer_norm_first = bool(model.get("layer_norm_first", False))
        self.prenet = int(image.get("prenet_depth", 4))
        self.patch_dim = int(image.get("embed_dim", 768))
        self.extra = int(image.get("num_extra_tokens", 0))
        if not model.get("norm_affine", True):
            raise SpecError("cfg.model.norm_affine: false (LayerNorms without weights) is not supported by "
                            "vision.vit_transformer.")
        if image.get("use_alibi_encoder", False):
            raise SpecError("cfg.model.modalities.image.use_alibi_encoder: true -- ALiBi image encoders are not "
                            "supported by vision.vit_transformer (the released image models use none).")
        if image.get("transformer_decoder", False):
            raise SpecError("cfg.model.modalities.image.transformer_decoder: true -- only the convolutional Decoder2d "
                            "imports (the released image models use it).")
        if not image.get("fixed_positions", True):
            raise SpecError("cfg.model.modalities.image.fixed_positions: false is not supported (no positions at all).")

    def backbone(self, regularisation: dict[str, Any] | None = None, pooling: dict[str, Any] | None = None) -> dict:
        """The ``feature_extractor`` and ``encoder`` spec nodes."""
        model, image = self.model, self.image
        reg = {
            "dropout": model.get("encoder_dropout", 0.1),
            "attention_dropout": model.get("attention_dropout", 0.1),
            "activation_dropout": model.get("activation_dropout", 0.0),
            "post_mlp_dropout": model.get("post_mlp_drop", 0.1),
            "prenet_dropout": image.get("prenet_dropout", 0.0),
            "dropout_input": model.get("dropout_input", 0.0),
            "layerdrop": model.get("layerdrop", 0.0),
            "prenet_layerdrop": image.get("prenet_layerdrop", 0.0),
            "drop_path_rate": max(float(model.get("end_drop_path_rate", 0.0)),
                                  float(image.get("end_drop_path_rate", 0.0))),
            **(regularisation or {}),
        }
        extractor = {
            "name": "vision.vit", "image_size": int(image.get("input_size", 224)),
            "patch_size": int(image.get("patch_size", 16)),
            "num_channels": int(image.get("in_chans", 3)), "num_extra_tokens": self.extra,
            "init_extra_token_zero": bool(image.get("init_extra_token_zero", True)),
        }
        if self.patch_dim != self.dim:
            extractor["patch_dim"] = self.patch_dim
        encoder = {
            "name": "vision.vit_transformer", "dim": self.dim, "layers": self.prenet + self.depth,
            "prenet_layers": self.prenet, "heads": self.heads, "ffn_dim": int(self.dim * self.mlp_ratio),
            "layer_norm_eps": self.norm_eps, "layer_norm_first": self.layer_norm_first,
            # fairseq's pre-LN AltBlock loses the residual around its MLP; reproduce it
            **({"mlp_residual": False} if self.layer_norm_first else {}),
            "num_extra_tokens": self.extra, **{k: float(v) for k, v in reg.items()},
            **(pooling or {"add_pooling_layer": False}),
        }
        return {"feature_extractor": extractor, "encoder": encoder}


def position_name(weights: dict[str, Tensor], prefix: str = "") -> str:
    """The positions' fairseq name in this file (older files: ``positional_encoder.*``)."""
    return next((M + n for n in POSITION_NAMES if prefix + M + n in weights), M + POSITION_NAMES[0])


def backbone_names(cfg: ImageConfig, positions: str = M + POSITION_NAMES[0]) -> list[Rename]:
    """Every backbone tensor of the image model ``cfg`` describes (no decoder), fairseq names
    relative to the ``data2vec_multi`` model."""
    if cfg.patch_dim != cfg.dim:
        table = linear("feature_extractor.projection", M + "local_encoder.0.proj")
        table += linear("feature_extractor.patch_projection", M + "local_encoder.1")
    else:
        table = linear("feature_extractor.projection", M + "local_encoder.proj")
    table.append(Rename("feature_extractor.positions", positions))
    if cfg.extra:
        table.append(Rename("feature_extractor.extra_tokens", M + "extra_tokens"))
    if cfg.layer_norm_first:
        table += linear("encoder.norm", "norm")
    else:
        table += linear("encoder.layer_norm", M + "context_encoder.norm")
    return table + encoder_blocks(M, cfg.prenet, cfg.depth, BLOCK)


def described(cfg: ImageConfig) -> str:
    """What a missing backbone tensor is, in the error."""
    return f"tensors of the data2vec 2.0 image model (depth {cfg.depth}, prenet_depth {cfg.prenet})"


def dropped(weights: dict[str, Tensor], prefix: str = "") -> set[str]:
    """Tensors fairseq itself drops (``encoder_mask``), counted as used."""
    return {prefix + M + n for n in DROPPED} & set(weights)


def backbone_tensors(weights: dict[str, Tensor], cfg: ImageConfig, where: str,
                     prefix: str = "") -> tuple[dict[str, Tensor], set[str]]:
    """The backbone under d2v names from ``weights`` (fairseq names under ``prefix``, which the
    error shows), and the fairseq names used."""
    table = prefixed(backbone_names(cfg, position_name(weights, prefix)), theirs=prefix)
    state, used = collect(table, weights, where, described(cfg))
    return state, used | dropped(weights, prefix)


def expected_shapes(cfg: ImageConfig) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, tuple]]:
    """What the config makes of each backbone tensor: ``{fairseq name: (shape, config keys)}`` for
    the named ones, and ``{name inside a block: (shape, config keys)}`` for every block's."""
    model, image = cfg.model.where, cfg.image.where
    patch, channels = int(cfg.image.get("patch_size", 16)), int(cfg.image.get("in_chans", 3))
    grid = (int(cfg.image.get("input_size", 224)) // patch) ** 2
    local = "local_encoder.0.proj.weight" if cfg.patch_dim != cfg.dim else "local_encoder.proj.weight"
    dim, ffn = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    width, mlp = f"{model}.embed_dim", f"{model}.embed_dim and mlp_ratio"
    named = {
        M + local: ((cfg.patch_dim, channels, patch, patch), f"{image}.embed_dim, in_chans and patch_size"),
        M + "fixed_positional_encoder.positions": ((1, grid, dim), f"{image}.input_size and patch_size with {width}"),
        M + "extra_tokens": ((1, cfg.extra, dim), f"{image}.num_extra_tokens and {width}"),
        **{f"{norm}.{kind}": ((dim,), width) for norm in ("norm", M + "context_encoder.norm") for kind in ("weight", "bias")},
    }
    block = {
        "attn.qkv.weight": ((3 * dim, dim), width), "attn.qkv.bias": ((3 * dim,), width),
        "attn.proj.weight": ((dim, dim), width), "attn.proj.bias": ((dim,), width),
        "mlp.fc1.weight": ((ffn, dim), mlp), "mlp.fc1.bias": ((ffn,), mlp),
        "mlp.fc2.weight": ((dim, ffn), mlp), "mlp.fc2.bias": ((dim,), width),
        **{f"{norm}.{kind}": ((dim,), width) for norm in ("norm1", "norm2") for kind in ("weight", "bias")},
    }
    return named, block


def check_config_fits(weights: dict[str, Tensor], cfg: ImageConfig, where: str, prefix: str = "") -> None:
    """A :class:`SpecError` naming the config keys behind a tensor whose shape the checkpoint's
    config does not give, or blocks beyond the configured depths (fairseq names, ``prefix``
    prepended): caught here, the user learns which setting disagrees, not which d2v parameter."""
    named, block = expected_shapes(cfg)
    legacy = {M + n: M + "fixed_positional_encoder.positions" for n in POSITION_NAMES}
    for name, tensor in weights.items():
        local = legacy.get(name[len(prefix):], name[len(prefix):]) if name.startswith(prefix) else None
        in_block = re.fullmatch(rf"(?:{re.escape(M)}context_encoder\.)?blocks\.\d+\.(.+)", local or "")
        shape, keys = named.get(local) or block.get(in_block.group(1) if in_block else "") or (None, "")
        if shape is not None and tuple(tensor.shape) != shape:
            raise SpecError(f"{where}: by {keys}, {name} should be {shape}, but the checkpoint's is "
                            f"{tuple(tensor.shape)}: its config and its weights disagree. Use the config the "
                            f"weights were trained with (or the file that goes with this config).")
    model, image = cfg.model.where, cfg.image.where
    for block_prefix, depth, key in ((f"{prefix}blocks.", cfg.depth, f"{model}.depth"),
                                     (f"{prefix}{M}context_encoder.blocks.", cfg.prenet, f"{image}.prenet_depth")):
        if any(n.startswith(f"{block_prefix}{depth}.") for n in weights):
            raise SpecError(f"{where}: {key} is {depth} but the checkpoint has {block_prefix}{depth}.*: its config "
                            f"and its weights disagree. Use the config the weights were trained with.")


def check_decoder_fits(weights: dict[str, Tensor], cfg: ImageConfig, where: str) -> None:
    """As :func:`check_config_fits`, for the ``Decoder2d`` tensors and ``cfg.decoder``."""
    decoder = cfg.decoder
    layers, dim = int(decoder.get("decoder_layers", 5)), int(decoder.get("decoder_dim", 384))
    kernel, groups = int(decoder.get("decoder_kernel", 5)), int(decoder.get("decoder_groups", 16))
    first = weights.get(M + "decoder.blocks.0.0.weight")
    if first is not None and tuple(first.shape) != (dim, cfg.dim // groups, kernel, kernel):
        raise SpecError(f"{where}: by {decoder.where}.decoder_dim, decoder_groups and decoder_kernel, "
                        f"{M}decoder.blocks.0.0.weight should be {(dim, cfg.dim // groups, kernel, kernel)}, but the "
                        f"checkpoint's is {tuple(first.shape)}: its config and its weights disagree.")
    present = {int(n.split(".")[4]) for n in weights if n.startswith(M + "decoder.blocks.")}
    if present and present != set(range(layers)):
        raise SpecError(f"{where}: {decoder.where}.decoder_layers is {layers} but the checkpoint has "
                        f"{len(present)} decoder blocks ({M}decoder.blocks.*): its config and its weights disagree.")


# --------------------------------------------------------------------------- data2vec_multi (pretraining)


class Data2VecMultiImageImporter:
    """fairseq ``data2vec_multi`` image pretraining checkpoints -> d2v ``data2vec2`` pretraining models."""

    def accepts(self, ckpt: FairseqCheckpoint) -> bool:
        return ckpt.name == "data2vec_multi" and any(k.startswith(M) for k in ckpt.model)

    def convert(self, ckpt: FairseqCheckpoint, options: dict[str, Any]) -> FairseqImport:
        notes: list[str] = []
        model = ConfigReader(ckpt.model_cfg, "cfg.model", known=MULTI_FIELDS, notes=notes)
        cfg = ImageConfig(model)
        spec = cfg.backbone()
        spec["objective"] = self.objective(cfg, ckpt)

        check_config_fits(ckpt.model, cfg, str(ckpt.path))
        check_decoder_fits(ckpt.model, cfg, str(ckpt.path))
        student, consumed = backbone_tensors(ckpt.model, cfg, str(ckpt.path))
        student["encoder.mask_embedding"] = torch.zeros(cfg.dim)
        if not any(k.startswith(M + "decoder.") for k in ckpt.model):
            raise SpecError(f"{ckpt.path}: no decoder tensors ({M}decoder.*) -- not a data2vec 2.0 pretraining "
                            f"checkpoint with a Decoder2d.")
        settings = spec["objective"]
        table = decoder_names(M + "decoder", settings["decoder_layers"], settings["decoder_projection_layers"])
        decoder, used = collect(table, ckpt.model, str(ckpt.path), described(cfg))
        state = {**student, **decoder}
        consumed |= used
        teacher, used = self.teacher(ckpt, cfg, student, spec["objective"]["ema_scope"], notes)
        state.update(teacher)
        consumed |= used
        state["num_updates"] = torch.zeros((), dtype=torch.long)
        if not ckpt.num_updates:
            notes.append("the checkpoint records no update count: the EMA schedule restarts at objective.ema_decay")
        notes.append("encoder.mask_embedding set to 0: fairseq has none (data2vec 2.0 drops masked patches; a "
                     "zero vector is fairseq's encoder_zero_mask)")
        self._drift_notes(model, cfg, notes)
        model.finish()
        return FairseqImport(spec=spec, task="pretrain", state_dict=state, consumed=consumed, notes=notes)

    @staticmethod
    def objective(cfg: ImageConfig, ckpt: FairseqCheckpoint) -> dict[str, Any]:
        """The ``data2vec2`` objective: 2-D block masks, ``Decoder2d`` (one projection), the CLS
        loss, and the teacher fairseq has (see :meth:`teacher_parts`)."""
        scope, copy_keys = Data2VecMultiImageImporter.teacher_parts(cfg)
        return objective(cfg.model, cfg.image, cfg.decoder, depth=cfg.depth, max_update=ckpt.max_update,
                         decoder_type="2d", mask_dims=2, decoder_projection_layers=1, encoder_zero_mask=False,
                         ema_scope=scope, copy_keys=copy_keys)

    @staticmethod
    def teacher_parts(cfg: ImageConfig) -> tuple[str, list[str]]:
        """``ema_scope`` and ``copy_keys`` (parts copied from the student at every update, which
        fairseq's teacher runs as the student's own): the whole model (``ema_encoder_only:
        false``; its patch embedding is the student's unless ``ema_local_encoder``), or the
        encoder whose input LayerNorm and prenet are the student's (fairseq averages the shared
        blocks only)."""
        if not cfg.model.get("ema_encoder_only", True):
            local = cfg.image.get("ema_local_encoder", False)
            return "all", [] if local else ["feature_extractor.projection", "feature_extractor.patch_projection"]
        return "encoder", ["layer_norm"] + [f"layers.{i}" for i in range(cfg.prenet)]

    @staticmethod
    def teacher(ckpt: FairseqCheckpoint, cfg: ImageConfig, student: dict[str, Tensor], scope: str,
                notes: list[str]) -> tuple[dict[str, Tensor], set[str]]:
        """The EMA teacher's state (``teacher.model.*``) from ``_ema``, and the names used."""
        where, keep = f"{ckpt.path} (_ema)", "" if scope == "all" else "encoder."
        if not ckpt.ema:
            notes.append("the checkpoint has no _ema (EMA teacher): the teacher starts as a copy of the student")
            source, used = dict(student), set()
        elif ema_holds_blocks_only(ckpt.ema):
            # ema_encoder_only: fairseq averaged the shared blocks only (names "<j>.attn.qkv.weight")
            check_config_fits({f"_ema.blocks.{k}": v for k, v in ckpt.ema.items()}, cfg, str(ckpt.path), "_ema.")
            table = rebased(backbone_names(cfg), "encoder.", "encoder.", "blocks.", "")
            mapped, used = collect_ema(table, ckpt.ema, where, described(cfg))
            source = {**student, **mapped}
            notes.append("ema_encoder_only: the teacher's shared blocks are fairseq's _ema; its LayerNorm and prenet "
                         "blocks are copied from the student at every update (fairseq runs the student's there)")
        else:
            check_config_fits({f"_ema.{k}": v for k, v in ckpt.ema.items()}, cfg, str(ckpt.path), "_ema.")
            # without ema_local_encoder fairseq's teacher has no patch embedding: it reuses the student's
            reuse = () if cfg.image.get("ema_local_encoder", False) else ("feature_extractor.projection.",
                                                                          "feature_extractor.patch_projection.")
            table = [r for r in backbone_names(cfg, position_name(ckpt.ema))
                     if not (reuse and r.ours.startswith(reuse) and r.theirs not in ckpt.ema)]
            mapped, _ = collect_ema(table, ckpt.ema, where, described(cfg))
            local = {k: v for k, v in student.items() if reuse and k.startswith(reuse)}
            source = {**local, **mapped}
            used = {f"_ema.{r.theirs}" for r in table if r.ours.startswith(keep)}
            used |= {f"_ema.{n}" for n in dropped(ckpt.ema)}
        source["encoder.mask_embedding"] = torch.zeros(cfg.dim)
        state = {f"teacher.model.{k[len(keep):]}": v for k, v in source.items() if k.startswith(keep)}
        return state, used

    @staticmethod
    def _drift_notes(model: ConfigReader, cfg: ImageConfig, notes: list[str]) -> None:
        image = cfg.image
        if float(model.get("start_drop_path_rate", 0.0)) or float(image.get("start_drop_path_rate", 0.0)):
            notes.append("drop path: d2v grows drop_path_rate linearly from 0 over all blocks; fairseq's per-part "
                         "start/end rates are approximated by their maximum end rate")
        if float(image.get("local_grad_mult", 1.0)) != 1.0:
            notes.append(f"local_grad_mult {image.get('local_grad_mult', 1.0)} (gradient scale of the patch embedding) "
                         "is not reproduced")
        if float(model.get("recon_loss", 0.0)) or model.get("shared_decoder", None):
            notes.append("recon_loss / shared_decoder are not reproduced (their tensors are not imported)")
        if float(image.get("mask_dropout", 0.0)) or float(image.get("keep_masked_pct", 0.0)):
            notes.append("mask_dropout / keep_masked_pct are not reproduced by d2v's inverse_block masking")


# --------------------------------------------------------------------------- mae_image_classification


class MaeImageClassificationImporter:
    """fairseq ``mae_image_classification`` over ``data2vec_multi`` -> d2v image classifiers."""

    def accepts(self, ckpt: FairseqCheckpoint) -> bool:
        return ckpt.name == "mae_image_classification" and any(k.startswith("model." + M) for k in ckpt.model)

    def convert(self, ckpt: FairseqCheckpoint, options: dict[str, Any]) -> FairseqImport:
        notes: list[str] = []
        top = ConfigReader(ckpt.model_cfg, "cfg.model", known=CLASSIFIER_FIELDS, notes=notes)
        pretrained = top.section("pretrained_model_args", known=("model", "task", "common", "checkpoint", "dataset",
                                                                 "distributed_training", "optimization", "optimizer",
                                                                 "lr_scheduler", "criterion", "bpe", "tokenizer",
                                                                 "ema", "scoring", "generation", "eval_lm",
                                                                 "interactive", "bmuf", "_name", "job_logging_cfg",
                                                                 "common_eval"))
        # fairseq's classifier writes its drop_path_rate into the backbone's config too
        inner = pretrained.section("model", known=MULTI_FIELDS + ("drop_path_rate",))
        if inner.values.get("_name") not in (None, "data2vec_multi"):
            raise SpecError(f"{ckpt.path}: mae_image_classification over '{inner.values.get('_name')}' -- only "
                            f"data2vec_multi (data2vec 2.0) backbones import here.")
        cfg = ImageConfig(inner, overrides={"norm_eps": top.get("norm_eps", None)})
        mode = str(top.get("prediction_mode", "MEAN_POOLING")).rsplit(".", 1)[-1].upper()
        if mode not in ("MEAN_POOLING", "CLS_TOKEN"):
            raise SpecError(f"{ckpt.path}: prediction_mode {mode} is not supported (MEAN_POOLING and CLS_TOKEN are).")
        use_fc_norm = bool(top.get("use_fc_norm", True))
        regularisation = {
            "dropout": top.get("encoder_dropout", 0.0), "attention_dropout": top.get("attention_dropout", 0.0),
            "activation_dropout": top.get("activation_dropout", 0.0), "post_mlp_dropout": top.get("post_mlp_drop", 0.0),
            "dropout_input": top.get("dropout_input", 0.0), "layerdrop": top.get("layerdrop", 0.0),
            "prenet_layerdrop": top.get("prenet_layerdrop", 0.0), "prenet_dropout": top.get("prenet_dropout", 0.0),
            "drop_path_rate": top.get("drop_path_rate", 0.1),
        }
        pooling = {"add_pooling_layer": True, "use_mean_pooling": mode == "MEAN_POOLING",
                   "use_pooler_norm": use_fc_norm}
        spec = cfg.backbone(regularisation, pooling)
        if "head.weight" not in ckpt.model or "head.bias" not in ckpt.model:
            raise SpecError(f"{ckpt.path}: the classifier tensors head.weight / head.bias are missing.")
        num_classes = int(ckpt.model["head.weight"].shape[0])
        declared = top.get("num_classes", 1000)
        if int(declared) != num_classes:
            notes.append(f"cfg.model.num_classes is {declared} but head.weight has {num_classes} rows; the weights win")
        spec["head"] = {"name": "image_classification", "num_labels": num_classes}

        check_config_fits(ckpt.model, cfg, str(ckpt.path), prefix="model.")
        state, consumed = backbone_tensors(ckpt.model, cfg, str(ckpt.path), prefix="model.")
        state["encoder.mask_embedding"] = torch.zeros(cfg.dim)
        if use_fc_norm:
            for kind in ("weight", "bias"):
                if f"fc_norm.{kind}" not in ckpt.model:
                    raise SpecError(f"{ckpt.path}: use_fc_norm is true but fc_norm.{kind} is missing.")
                state[f"encoder.pooler_norm.{kind}"] = ckpt.model[f"fc_norm.{kind}"].float()
                consumed.add(f"fc_norm.{kind}")
        state["head.classifier.weight"] = ckpt.model["head.weight"].float()
        state["head.classifier.bias"] = ckpt.model["head.bias"].float()
        consumed |= {"head.weight", "head.bias"}
        notes.append("encoder.mask_embedding set to 0 (fairseq has none)")
        if float(regularisation["drop_path_rate"]) > 0 and cfg.prenet:
            notes.append("drop path grows linearly over all blocks in d2v; fairseq spreads the same 0 -> "
                         "drop_path_rate ramp over the shared blocks and starts the prenet's on it")
        top.finish()
        return FairseqImport(spec=spec, task="finetune", state_dict=state, consumed=consumed, notes=notes)
