"""fairseq's data2vec 2.0 text model (``data2vec_multi``, TEXT) in d2v terms: spec and weight names.

fairseq (examples/data2vec/models/data2vec2.py, modalities/text.py, modalities/modules.py)::

    M = modality_encoders.TEXT.
    M.local_encoder.embed_tokens         nn.Embedding(V, D, pad)    -> feature_extractor.word_embeddings
    M.local_encoder.embed_positions      learned, rows = 512 + 2    -> feature_extractor.position_embeddings
    M.local_encoder.layernorm_embedding  LayerNorm (eps 1e-5)       -> feature_extractor.layer_norm
    blocks.{i}.attn.qkv                  fused (3D, D): q, k, v     -> encoder.layers.{i}.self_attention.{q,k,v}_proj
    blocks.{i}.attn.proj                                            -> encoder.layers.{i}.self_attention.out_proj
    blocks.{i}.norm1 / norm2             post-LN AltBlock           -> encoder.layers.{i}.attention_norm / ffn_norm
    blocks.{i}.mlp.fc1 / fc2             timm Mlp (exact GELU)      -> encoder.layers.{i}.ffn.fc1 / fc2
    M.decoder.blocks.{i}.0               Conv1d of Decoder1d        -> decoder.blocks.{i}.conv
    M.decoder.proj(.0/.2)                Linear (-> GELU -> Linear) -> decoder.proj(.0/.2)
    _ema: {i}.<block tensor>             EMA of ``blocks`` only     -> teacher.model.layers.{i}.*

A post-LN ``AltBlock`` is ``LN1(x + drop(attn(x)))`` then ``LN2(r + drop(mlp(r)))``, the same
computation as ``text.transformer``'s layer once the fused ``qkv`` is split in three. The
embeddings (with their LayerNorm and dropout) run before tokens are dropped; the text encoder
has no prenet (``prenet_depth: 0``), no extra tokens and no positional encoder of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from d2v.errors import SpecError
from d2v.fairseq import ConfigReader
from d2v_text.fairseq_v1 import LAYER_NORM_EPS, shapes

M = "modality_encoders.TEXT."
LOCAL = M + "local_encoder."

# fairseq's dataclass fields (data2vec2.py Data2VecMultiConfig, modalities/base.py, text.py, modules.py)
MULTI_FIELDS = (
    "loss_beta", "loss_scale", "depth", "start_drop_path_rate", "end_drop_path_rate", "num_heads", "norm_eps",
    "norm_affine", "encoder_dropout", "post_mlp_drop", "attention_dropout", "activation_dropout", "dropout_input",
    "layerdrop", "embed_dim", "mlp_ratio", "layer_norm_first", "average_top_k_layers", "end_of_block_targets",
    "clone_batch", "layer_norm_target_layer", "batch_norm_target_layer", "instance_norm_target_layer",
    "instance_norm_targets", "layer_norm_targets", "ema_decay", "ema_same_dtype", "log_norms", "ema_end_decay",
    "ema_anneal_end_step", "ema_encoder_only", "max_update", "modalities", "shared_decoder", "min_target_var",
    "min_pred_var", "supported_modality", "mae_init", "seed", "skip_ema", "cls_loss", "recon_loss", "d2v_loss",
    "decoder_group",
)
TEXT_FIELDS = (
    "type", "prenet_depth", "prenet_layerdrop", "prenet_dropout", "start_drop_path_rate", "end_drop_path_rate",
    "num_extra_tokens", "init_extra_token_zero", "mask_noise_std", "mask_prob_min", "mask_prob", "inverse_mask",
    "mask_prob_adjust", "keep_masked_pct", "mask_length", "add_masks", "remove_masks", "mask_dropout",
    "encoder_zero_mask", "mask_channel_prob", "mask_channel_length", "ema_local_encoder", "local_grad_mult",
    "use_alibi_encoder", "alibi_scale", "learned_alibi", "alibi_max_pos", "learned_alibi_scale",
    "learned_alibi_scale_per_head", "learned_alibi_scale_per_layer", "num_alibi_heads", "model_depth", "decoder",
    "max_source_positions", "learned_pos", "dropout", "no_scale_embedding", "layernorm_embedding",
    "no_token_positional_embeddings",
)
DECODER_FIELDS = (
    "decoder_dim", "decoder_groups", "decoder_kernel", "decoder_layers", "input_dropout", "add_positions_masked",
    "add_positions_all", "decoder_residual", "projection_layers", "projection_ratio",
)
BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
SIMPLE = {"norm1": "attention_norm", "attn.proj": "self_attention.out_proj", "norm2": "ffn_norm",
          "mlp.fc1": "ffn.fc1", "mlp.fc2": "ffn.fc2"}


class TextV2Arch:
    """The parts of a ``data2vec_multi`` config that shape the text backbone, read once."""

    def __init__(self, model: ConfigReader):
        self.model = model
        modalities = model.section("modalities", known=("audio", "image", "text", "_name"))
        self.text = text = modalities.section("text", known=TEXT_FIELDS)
        self.decoder = text.section("decoder", known=DECODER_FIELDS)
        self.depth = int(model.get("depth", 8))
        self.dim = int(model.get("embed_dim", 768))
        self.heads = int(model.get("num_heads", 12))
        self.mlp_ratio = float(model.get("mlp_ratio", 4.0))
        self.norm_eps = float(model.get("norm_eps", 1e-6))
        problems = []
        checks = (
            (model.get("layer_norm_first", False), "layer_norm_first: true (pre-LN; text.transformer is post-LN)"),
            (not model.get("norm_affine", True), "norm_affine: false (LayerNorms without weights)"),
            (int(text.get("prenet_depth", 4)) > 0, "modalities.text.prenet_depth > 0 (text.transformer has no prenet; "
                                                   "the released text models use 0)"),
            (int(text.get("num_extra_tokens", 0)) > 0, "modalities.text.num_extra_tokens > 0"),
            (text.get("use_alibi_encoder", False), "modalities.text.use_alibi_encoder: true"),
            (not text.get("learned_pos", True) or text.get("no_token_positional_embeddings", False),
             "sinusoidal or no positions (text.embeddings has learned positions)"),
            (not text.get("no_scale_embedding", True), "no_scale_embedding: false (scaled embeddings)"),
            (not text.get("layernorm_embedding", True), "layernorm_embedding: false"),
        )
        problems = [message for bad, message in checks if bad]
        if problems:
            raise SpecError(f"this fairseq data2vec 2.0 text checkpoint ({model.where}) has settings d2v cannot "
                            f"reproduce: {'; '.join(problems)}.")

    def backbone(self, weights: dict[str, Tensor], regularisation: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``feature_extractor`` and ``encoder`` spec nodes (``weights`` under fairseq names,
        any prefix already stripped)."""
        vocab, positions = shapes(weights, self.dim, prefix=LOCAL)
        model, text = self.model, self.text
        reg = {"dropout": float(model.get("encoder_dropout", 0.1)),
               "attention_dropout": float(model.get("attention_dropout", 0.1)),
               "embedding_dropout": float(text.get("dropout", 0.1)), **(regularisation or {})}
        return {
            "feature_extractor": {"name": "text.embeddings", "vocab_size": vocab, "max_position_embeddings": positions,
                                  "type_vocab_size": 0, "padding_idx": 1, "layer_norm_eps": LAYER_NORM_EPS,
                                  "dropout": reg["embedding_dropout"]},
            "encoder": {"name": "text.transformer", "dim": self.dim, "layers": self.depth, "heads": self.heads,
                        "ffn_dim": int(self.dim * self.mlp_ratio), "activation": "gelu", "dropout": reg["dropout"],
                        "attention_dropout": reg["attention_dropout"], "layer_norm_eps": self.norm_eps,
                        "add_pooling_layer": False},
        }

    def notes(self) -> list[str]:
        model, text = self.model, self.text
        notes = []
        enc, post = float(model.get("encoder_dropout", 0.1)), float(model.get("post_mlp_drop", 0.1))
        if enc != post:
            notes.append(f"encoder_dropout {enc} and post_mlp_drop {post} differ; text.transformer has one dropout "
                         f"after attention and FFN ({enc} is used)")
        for key, default in (("activation_dropout", 0.0), ("dropout_input", 0.0), ("layerdrop", 0.0),
                             ("end_drop_path_rate", 0.0)):
            if float(model.get(key, default)):
                notes.append(f"cfg.model.{key} {model.get(key, default)} is not reproduced by text.transformer")
        if float(text.get("local_grad_mult", 1.0)) != 1.0:
            notes.append(f"local_grad_mult {text.get('local_grad_mult', 1.0)} (gradient scale of the embeddings) "
                         "is not reproduced")
        return notes


def block_tensors(weights: dict[str, Tensor], theirs: str, ours: str, dim: int) -> tuple[dict[str, Tensor], list[str]]:
    """One AltBlock (``theirs`` = its fairseq prefix) as a ``text.transformer`` layer (``ours``):
    the d2v tensors and the fairseq names used. The fused ``qkv`` rows are q, k, v in that order
    (fairseq reshapes them to ``(3, heads, head_dim)``)."""
    out: dict[str, Tensor] = {}
    used: list[str] = []
    for part in BLOCK_PARTS:
        for kind in ("weight", "bias"):
            name = f"{theirs}{part}.{kind}"
            value = weights[name].float()
            used.append(name)
            if part == "attn.qkv":
                for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"{ours}self_attention.{proj}.{kind}"] = value[index * dim:(index + 1) * dim].clone()
            else:
                out[f"{ours}{SIMPLE[part]}.{kind}"] = value
    return out, used


def required_names(depth: int, block_prefix: str = "blocks.", prefix: str = "") -> list[str]:
    """Every fairseq name of the backbone (no decoder)."""
    names = [prefix + LOCAL + n for n in ("embed_tokens.weight", "embed_positions.weight",
                                          "layernorm_embedding.weight", "layernorm_embedding.bias")]
    for i in range(depth):
        names += [f"{prefix}{block_prefix}{i}.{p}.{k}" for p in BLOCK_PARTS for k in ("weight", "bias")]
    return names


def check_complete(weights: dict[str, Tensor], names: list[str], where: str, shown_prefix: str = "") -> None:
    missing = [shown_prefix + n for n in names if n not in weights]
    if missing:
        raise SpecError(f"{where}: the checkpoint lacks {len(missing)} tensors of the data2vec 2.0 text model: "
                        f"{', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}. Is the file complete "
                        f"(download it again), and does its cfg.model match its weights?")


def backbone_tensors(weights: dict[str, Tensor], arch: TextV2Arch, where: str,
                     prefix: str = "", shown_prefix: str = "") -> tuple[dict[str, Tensor], set[str]]:
    """The backbone under d2v names from fairseq-named ``weights`` (names under ``prefix``;
    errors show them under ``shown_prefix``, e.g. ``model.`` when the caller stripped it)."""
    check_complete(weights, required_names(arch.depth, prefix=prefix), where, shown_prefix)
    state = {
        "feature_extractor.word_embeddings.weight": weights[prefix + LOCAL + "embed_tokens.weight"].float(),
        "feature_extractor.position_embeddings.weight": weights[prefix + LOCAL + "embed_positions.weight"].float(),
        "feature_extractor.layer_norm.weight": weights[prefix + LOCAL + "layernorm_embedding.weight"].float(),
        "feature_extractor.layer_norm.bias": weights[prefix + LOCAL + "layernorm_embedding.bias"].float(),
    }
    used = {prefix + LOCAL + n for n in ("embed_tokens.weight", "embed_positions.weight",
                                         "layernorm_embedding.weight", "layernorm_embedding.bias")}
    for i in range(arch.depth):
        tensors, names = block_tensors(weights, f"{prefix}blocks.{i}.", f"encoder.layers.{i}.", arch.dim)
        state.update(tensors)
        used.update(names)
    return state, used


def decoder_tensors(weights: dict[str, Tensor], arch: TextV2Arch, where: str) -> tuple[dict[str, Tensor], set[str]]:
    """``Decoder1d``: ``M.decoder.blocks.{i}.0`` -> ``decoder.blocks.{i}.conv``, ``M.decoder.proj*`` as is."""
    prefix = M + "decoder."
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, value in weights.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        parts = rest.split(".")
        if rest.startswith("proj."):
            state["decoder." + rest] = value.float()
        elif len(parts) == 4 and parts[0] == "blocks" and parts[2] == "0":
            state[f"decoder.blocks.{parts[1]}.conv.{parts[3]}"] = value.float()
        else:
            continue
        used.add(name)
    if not state:
        raise SpecError(f"{where}: no decoder tensors ({prefix}*) -- not a data2vec 2.0 text pretraining checkpoint "
                        f"with its Decoder1d (fine-tuned files drop it; they import as data2vec_text_classification).")
    return state, used


def objective_spec(arch: TextV2Arch, max_update: int) -> dict[str, Any]:
    """The ``data2vec2`` objective node of a ``data2vec_multi`` text config."""
    model, text, decoder = arch.model, arch.text, arch.decoder
    if model.get("batch_norm_target_layer", False):
        raise SpecError("cfg.model.batch_norm_target_layer: true is not supported by the data2vec target.")
    projection_layers = int(decoder.get("projection_layers", 1))
    ratio = float(decoder.get("projection_ratio", 2.0))
    if projection_layers > 1 and ratio != 2.0:
        raise SpecError(f"cfg.model.modalities.text.decoder.projection_ratio {ratio}: d2v's decoder widens its "
                        f"projection by 2 (the released value).")
    if decoder.get("add_positions_masked", False) or decoder.get("add_positions_all", False):
        raise SpecError("cfg.model.modalities.text.decoder.add_positions_*: true needs a fixed positional encoder, "
                        "which the text encoder has not (fairseq itself would fail).")
    layer_norm = "instance" if model.get("instance_norm_target_layer", False) else (
        "layer" if model.get("layer_norm_target_layer", False) else None)
    final_norm = "layer" if model.get("layer_norm_targets", False) else (
        "instance" if model.get("instance_norm_targets", False) else None)
    beta = float(model.get("loss_beta", 0.0))
    scale = model.get("loss_scale", None)
    target = {"name": "data2vec", "top_k": min(int(model.get("average_top_k_layers", 8)), arch.depth),
              "layer_norm": layer_norm, "final_norm": final_norm, "loss": "l2" if beta == 0 else "smooth_l1",
              "loss_scale": None if scale is None else float(scale)}
    if beta:
        target["beta"] = beta
    mask_length = int(text.get("mask_length", 5))
    mask_prob = float(text.get("mask_prob", 0.7))
    if mask_length == 1:
        masking = {"name": "random", "mask_prob": mask_prob}
    else:
        masking = {"name": "inverse_block", "dims": 1, "inverse": bool(text.get("inverse_mask", False)),
                   "mask_prob": mask_prob, "mask_length": mask_length,
                   "mask_prob_adjust": float(text.get("mask_prob_adjust", 0.0))}
    return {
        "name": "data2vec2",
        "clone_batch": int(model.get("clone_batch", 1)),
        "target": target,
        "masking": masking,
        "decoder_type": "1d",
        "decoder_dim": int(decoder.get("decoder_dim", 384)),
        "decoder_kernel": int(decoder.get("decoder_kernel", 5)),
        "decoder_layers": int(decoder.get("decoder_layers", 5)),
        "decoder_groups": int(decoder.get("decoder_groups", 16)),
        "decoder_residual": bool(decoder.get("decoder_residual", True)),
        "decoder_projection_layers": projection_layers,
        "decoder_input_dropout": float(decoder.get("input_dropout", 0.1)),
        "mask_noise_std": float(text.get("mask_noise_std", 0.01)),
        "encoder_zero_mask": bool(text.get("encoder_zero_mask", True)),
        "cls_loss": 0.0,
        "ema_scope": "encoder",
        "copy_keys": [],
        "ema_decay": float(model.get("ema_decay", 0.999)),
        "ema_end_decay": float(model.get("ema_end_decay", 0.9999)),
        "ema_anneal_end_step": int(model.get("ema_anneal_end_step", max_update) or max_update),
        "target_feature": "end" if model.get("end_of_block_targets", False) else "ffn",
        "min_target_std": float(model.get("min_target_var", 0.1)),
        "min_pred_std": float(model.get("min_pred_var", 0.01)),
    }


def teacher_tensors(ema: dict[str, Tensor], arch: TextV2Arch, student: dict[str, Tensor],
                    where: str, notes: list[str]) -> tuple[dict[str, Tensor], set[str]]:
    """``teacher.model.*`` (the EMA of the Transformer layers) from fairseq's ``_ema``.

    ``ema_encoder_only`` (the released setting) saves the EMA of ``blocks`` as ``"{i}.attn.qkv.weight"``;
    otherwise ``_ema`` is the whole model and its ``blocks.*`` are taken (the teacher reuses the
    student's embeddings either way, as fairseq does without ``ema_local_encoder``)."""
    if not ema:
        notes.append("the checkpoint has no _ema (EMA teacher): the teacher starts as a copy of the student")
        return {f"teacher.model.{k[len('encoder.'):]}": v.clone() for k, v in student.items()
                if k.startswith("encoder.")}, set()
    block_prefix = "" if all(k.split(".", 1)[0].isdigit() for k in ema) else "blocks."
    names = [f"{block_prefix}{i}.{p}.{k}" for i in range(arch.depth) for p in BLOCK_PARTS for k in ("weight", "bias")]
    check_complete(ema, names, f"{where} (_ema)", shown_prefix="_ema.")
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    for i in range(arch.depth):
        tensors, fs_names = block_tensors(ema, f"{block_prefix}{i}.", f"teacher.model.layers.{i}.", arch.dim)
        state.update(tensors)
        used.update("_ema." + n for n in fs_names)
    if block_prefix and arch.text.get("ema_local_encoder", False):
        notes.append("ema_local_encoder: fairseq's teacher has its own embeddings (_ema.modality_encoders.TEXT.*); "
                     "d2v's text teacher reuses the student's, so those are not imported")
    return state, used


def zero_step() -> Tensor:
    return torch.zeros((), dtype=torch.long)
