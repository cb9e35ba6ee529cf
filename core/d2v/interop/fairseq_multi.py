"""fairseq's ``data2vec_multi`` (data2vec 2.0) configuration, read once for every modality.

The 2.0 model of every modality shares one config layout (``Data2VecMultiConfig`` with a
``D2vModalityConfig`` per modality and a ``D2vDecoderConfig``, fairseq
``examples/data2vec/models/data2vec2.py`` and ``modalities/{base,modules}.py``) and one objective.
The modality plugins' importers build their backbones themselves and take from here the field
names (what :class:`d2v.interop.fairseq.ConfigReader` treats as known), the parts of the ``data2vec2``
objective spec that do not depend on the modality (target, masking, decoder and EMA settings) and
the weight names every modality shares (the blocks, :func:`encoder_blocks`; the decoder,
:func:`decoder_names`; the layout of the EMA teacher), as :mod:`d2v.interop.fairseq_names` tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from d2v.api.errors import SpecError
from d2v.interop.fairseq import ConfigReader
from d2v.interop.fairseq_names import Rename, fused_qkv, linear

#: ``Data2VecMultiConfig`` fields
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
#: ``D2vModalityConfig`` fields (every modality has them; each adds its own)
MODALITY_FIELDS = (
    "type", "prenet_depth", "prenet_layerdrop", "prenet_dropout", "start_drop_path_rate", "end_drop_path_rate",
    "num_extra_tokens", "init_extra_token_zero", "mask_noise_std", "mask_prob_min", "mask_prob", "inverse_mask",
    "mask_prob_adjust", "keep_masked_pct", "mask_length", "add_masks", "remove_masks", "mask_dropout",
    "encoder_zero_mask", "mask_channel_prob", "mask_channel_length", "ema_local_encoder", "local_grad_mult",
    "use_alibi_encoder", "alibi_scale", "learned_alibi", "alibi_max_pos", "learned_alibi_scale",
    "learned_alibi_scale_per_head", "learned_alibi_scale_per_layer", "num_alibi_heads", "model_depth", "decoder",
)
#: ``D2vDecoderConfig`` fields
DECODER_FIELDS = (
    "decoder_dim", "decoder_groups", "decoder_kernel", "decoder_layers", "input_dropout", "add_positions_masked",
    "add_positions_all", "decoder_residual", "projection_layers", "projection_ratio",
)


class UnsupportedObjective(SpecError):
    """The checkpoint's objective has no d2v equivalent (the backbone may still import)."""


def target(model: ConfigReader, depth: int) -> dict[str, Any]:
    """The ``data2vec`` target: fairseq averages the top ``average_top_k_layers`` of the
    ``depth`` shared blocks (never the prenet), normalising each and/or the average."""
    per_layer = [name for key, name in (("instance_norm_target_layer", "instance"), ("layer_norm_target_layer", "layer"))
                 if model.get(key, False)]
    final = [name for key, name in (("layer_norm_targets", "layer"), ("instance_norm_targets", "instance"))
             if model.get(key, False)]
    if model.get("batch_norm_target_layer", False) or len(per_layer) > 1 or len(final) > 1:
        raise UnsupportedObjective(
            "the checkpoint's target normalisation (batch norm, or two norms at one place) has no d2v equivalent "
            "(d2v's data2vec target: instance or layer norm per layer, instance or layer norm on the average).")
    top_k = int(model.get("average_top_k_layers", 8))
    if top_k > depth:
        model.notes.append(f"average_top_k_layers={top_k} > depth={depth}: fairseq averages the {depth} shared "
                           f"blocks, so top_k is {depth}")
        top_k = depth
    beta = float(model.get("loss_beta", 0.0))
    scale = model.get("loss_scale", None)
    return {"name": "data2vec", "top_k": top_k, "layer_norm": per_layer[0] if per_layer else None,
            "final_norm": final[0] if final else None, "loss": "l2" if beta == 0 else "smooth_l1",
            **({} if beta == 0 else {"beta": beta}), "loss_scale": None if scale is None else float(scale)}


def masking(modality: ConfigReader, dims: int) -> dict[str, Any]:
    """fairseq masks single tokens at random when ``mask_length`` is 1, blocks otherwise."""
    mask_length = int(modality.get("mask_length", 5))
    mask_prob = float(modality.get("mask_prob", 0.7))
    if mask_length == 1:
        return {"name": "random", "mask_prob": mask_prob}
    return {"name": "inverse_block", "dims": dims, "inverse": bool(modality.get("inverse_mask", False)),
            "mask_prob": mask_prob, "mask_length": mask_length,
            "mask_prob_adjust": float(modality.get("mask_prob_adjust", 0.0))}


def decoder(config: ConfigReader, decoder_type: str) -> dict[str, Any]:
    """The ``decoder_*`` settings of the objective (``Decoder1d`` / ``Decoder2d``)."""
    projection_layers = int(config.get("projection_layers", 1))
    ratio = float(config.get("projection_ratio", 2.0))
    if projection_layers > 1 and ratio != 2.0:
        raise UnsupportedObjective(f"{config.where}.projection_ratio {ratio}: d2v's decoder widens its projection "
                                   f"by 2 (the released value).")
    if config.get("add_positions_masked", False) or config.get("add_positions_all", False):
        raise UnsupportedObjective(f"{config.where}.add_positions_*: true (a decoder that adds fixed positions) is "
                                   f"not supported.")
    return {"decoder_type": decoder_type, "decoder_dim": int(config.get("decoder_dim", 384)),
            "decoder_kernel": int(config.get("decoder_kernel", 5)), "decoder_layers": int(config.get("decoder_layers", 5)),
            "decoder_groups": int(config.get("decoder_groups", 16)),
            "decoder_residual": bool(config.get("decoder_residual", True)),
            "decoder_projection_layers": projection_layers,
            "decoder_input_dropout": float(config.get("input_dropout", 0.1))}


def ema_and_guards(model: ConfigReader, max_update: int) -> dict[str, Any]:
    """EMA schedule, target feature, clone count and the collapse guard; ``max_update``
    (``cfg.optimization``) is fairseq's default anneal length."""
    return {"clone_batch": int(model.get("clone_batch", 1)),
            "ema_decay": float(model.get("ema_decay", 0.999)),
            "ema_end_decay": float(model.get("ema_end_decay", 0.9999)),
            "ema_anneal_end_step": int(model.get("ema_anneal_end_step", max_update) or max_update or 0),
            "target_feature": "end" if model.get("end_of_block_targets", False) else "ffn",
            "min_target_std": float(model.get("min_target_var", 0.1)),
            "min_pred_std": float(model.get("min_pred_var", 0.01))}


def objective(model: ConfigReader, modality: ConfigReader, decoder_config: ConfigReader, *, depth: int,
              max_update: int, decoder_type: str = "1d", mask_dims: int = 1, **modality_specific: Any) -> dict[str, Any]:
    """The ``data2vec2`` objective node; ``modality_specific`` adds or overrides keys
    (``ema_scope``, ``copy_keys``, ``cls_loss``, ``encoder_zero_mask``, ...)."""
    if model.get("shared_decoder", None) is not None:
        raise UnsupportedObjective("it uses a shared_decoder across modalities (d2v's data2vec2 has one decoder).")
    if float(model.get("d2v_loss", 1.0)) != 1.0:
        model.notes.append(f"cfg.model.d2v_loss={model.get('d2v_loss', 1.0)} (a loss weight) is not reproduced")
    for key, default in (("mask_prob_min", None), ("mask_dropout", 0.0), ("add_masks", False),
                         ("keep_masked_pct", 0.0), ("mask_channel_prob", 0.0)):
        if modality.get(key, default) not in (default, 0, 0.0, None, False):
            model.notes.append(f"{modality.where}.{key}={modality.get(key, default)!r} is not reproduced by d2v's "
                               f"data2vec2 masking")
    return {"name": "data2vec2", "target": target(model, depth), "masking": masking(modality, mask_dims),
            **decoder(decoder_config, decoder_type),
            "mask_noise_std": float(modality.get("mask_noise_std", 0.01)),
            "encoder_zero_mask": bool(modality.get("encoder_zero_mask", True)),
            "cls_loss": float(model.get("cls_loss", 0.0)),
            **ema_and_guards(model, max_update), **modality_specific}


# --------------------------------------------------------------------------- weight names


#: the parts of fairseq's ``AltBlock`` (modalities/modules.py), the block of every 2.0 encoder: the
#: modality's prenet (``modality_encoders.<M>.context_encoder.blocks.{i}``) and the shared ``blocks.{i}``
ALT_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
#: d2v's module for each :data:`ALT_BLOCK` part (three modules for ``attn.qkv``: q, k, v apart)
PartNames = dict[str, str | tuple[str, str, str]]


def alt_block(ours: str, theirs: str, names: PartNames) -> list[Rename]:
    """One ``AltBlock`` (fairseq prefix ``theirs``) as the d2v layer ``ours``: ``names`` gives
    d2v's module of each :data:`ALT_BLOCK` part; three modules for ``attn.qkv`` split the fused
    projection into q, k and v."""
    table: list[Rename] = []
    for part in ALT_BLOCK:
        module = names[part]
        if isinstance(module, tuple):
            table += fused_qkv([f"{ours}.{m}" for m in module], f"{theirs}.{part}")
        else:
            table += linear(f"{ours}.{module}", f"{theirs}.{part}")
    return table


def encoder_blocks(modality: str, prenet: int, depth: int, names: PartNames) -> list[Rename]:
    """``encoder.layers.*``: the ``prenet`` blocks of the modality encoder (fairseq prefix
    ``modality``, ``modality_encoders.<M>.``), then the ``depth`` shared ``blocks`` (:func:`alt_block`)."""
    table: list[Rename] = []
    for i in range(prenet):
        table += alt_block(f"encoder.layers.{i}", f"{modality}context_encoder.blocks.{i}", names)
    for i in range(depth):
        table += alt_block(f"encoder.layers.{prenet + i}", f"blocks.{i}", names)
    return table


def decoder_names(theirs: str, layers: int, projection_layers: int) -> list[Rename]:
    """``Decoder1d`` / ``Decoder2d`` (fairseq prefix ``theirs``, ``modality_encoders.<M>.decoder``):
    ``blocks.{i}.0`` (the conv) -> ``decoder.blocks.{i}.conv``; ``proj`` as is (with several
    projection layers, Linear, GELU, ..., Linear: the Linear layers sit at even indices in both)."""
    table: list[Rename] = []
    for i in range(layers):
        table += linear(f"decoder.blocks.{i}.conv", f"{theirs}.blocks.{i}.0")
    if projection_layers == 1:
        return table + linear("decoder.proj", f"{theirs}.proj")
    for k in range(0, 2 * projection_layers, 2):
        table += linear(f"decoder.proj.{k}", f"{theirs}.proj.{k}")
    return table


def ema_holds_blocks_only(ema: Iterable[str]) -> bool:
    """Whether fairseq's ``_ema`` is the EMA of the shared ``blocks`` alone (``ema_encoder_only``,
    the released setting), named ``{i}.<block tensor>``, rather than of the whole model."""
    return all(name.split(".", 1)[0].isdigit() for name in ema)
