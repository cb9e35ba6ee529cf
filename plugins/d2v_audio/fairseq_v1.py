"""fairseq's data2vec 1.0 audio model (``data2vec_audio``) in d2v terms: spec and weight names.

fairseq (``examples/data2vec/models/data2vec_audio.py`` on ``fairseq/models/wav2vec/wav2vec2.py``)::

    feature_extractor.conv_layers.{i}.0      Conv1d             -> feature_extractor.conv_layers.{i}.conv
    feature_extractor.conv_layers.{i}.2.1    Fp32LayerNorm      -> feature_extractor.conv_layers.{i}.norm
    layer_norm                               LN of the conv out -> feature_extractor.norm
    post_extract_proj                        Linear             -> feature_extractor.proj
    mask_emb                                                    -> encoder.mask_embedding
    encoder.pos_conv.{j}.0                   grouped Conv1d     -> encoder.pos_conv.layers.{j}.conv
    encoder.layer_norm                                          -> encoder.layer_norm
    encoder.layers.{l}.self_attn.{q,k,v,out}_proj               -> encoder.layers.{l}.attention.*
    encoder.layers.{l}.self_attn_layer_norm                     -> encoder.layers.{l}.attention_norm
    encoder.layers.{l}.fc1 / fc2                                -> encoder.layers.{l}.ffn.fc1 / fc2
    encoder.layers.{l}.final_layer_norm                         -> encoder.layers.{l}.ffn_norm
    final_proj (.0 in released files)        regression head    -> regression_head (objective data2vec)
    _ema.* (the EMA of ``encoder``)                             -> teacher.model.*

Only ``extractor_mode: layer_norm``, ``pos_conv_depth > 1`` (data2vec's stack of small
convs, kernel ``max(3, conv_pos // pos_conv_depth)``) and post-LN layers exist in d2v's
``audio.conv`` + ``audio.transformer``; anything else stops the import with a SpecError.
"""

from __future__ import annotations

import ast
from typing import Any

from d2v.api.errors import SpecError
from d2v.interop.fairseq import ConfigReader
from d2v.interop.fairseq_names import Rename, linear

#: fairseq activation names (``fairseq.utils.get_activation_fn``) -> d2v's
ACTIVATIONS = {"gelu": "gelu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new", "relu": "relu",
               "swish": "silu", "tanh": "tanh"}

#: ``Wav2Vec2Config`` fields (fairseq/models/wav2vec/wav2vec2.py)
WAV2VEC2_FIELDS = (
    "extractor_mode", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
    "activation_fn", "layer_type", "dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
    "dropout_input", "dropout_features", "final_dim", "layer_norm_first", "conv_feature_layers", "conv_bias",
    "logit_temp", "quantize_targets", "quantize_input", "same_quantizer", "target_glu", "feature_grad_mult",
    "quantizer_depth", "quantizer_factor", "latent_vars", "latent_groups", "latent_dim", "mask_length", "mask_prob",
    "mask_selection", "mask_other", "no_mask_overlap", "mask_min_space", "require_same_masks", "mask_dropout",
    "mask_channel_length", "mask_channel_prob", "mask_channel_before", "mask_channel_selection", "mask_channel_other",
    "no_mask_channel_overlap", "mask_channel_min_space", "num_negatives", "negatives_from_everywhere",
    "cross_sample_negatives", "codebook_negatives", "conv_pos", "conv_pos_groups", "pos_conv_depth", "latent_temp",
    "max_positions", "checkpoint_activations", "required_seq_len_multiple", "crop_seq_to_multiple",
    "depthwise_conv_kernel_size", "attn_type", "pos_enc_type", "fp16", "adp_num", "adp_dim", "adp_act_fn",
    "adp_trf_idx",
)
#: ``Data2VecAudioConfig`` = the above + these (examples/data2vec/models/data2vec_audio.py)
DATA2VEC_AUDIO_FIELDS = WAV2VEC2_FIELDS + (
    "loss_beta", "loss_scale", "average_top_k_layers", "layer_norm_target_layer", "instance_norm_target_layer",
    "instance_norm_targets", "layer_norm_targets", "batch_norm_target_layer", "group_norm_target_layer",
    "ema_decay", "ema_end_decay", "ema_anneal_end_step", "ema_transformer_only", "ema_layers_only", "max_update",
    "min_target_var", "min_pred_var",
)

#: where the backbone's weights live, and the settings that say how many there are
BACKBONE_PREFIXES = ("feature_extractor.", "layer_norm.", "post_extract_proj.", "encoder.")
SHAPE_SETTINGS = "conv_feature_layers, conv_bias, encoder_layers, pos_conv_depth"
DEFAULT_CONV = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
LAYER_NORM_EPS = 1e-5  # fairseq's LayerNorm / Fp32LayerNorm default


# --------------------------------------------------------------------------- config values (1.0 and 2.0)


def conv_layers(spec: str, where: str) -> list[tuple[int, int, int]]:
    """fairseq's conv stack string, e.g. ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``, read without
    ``eval``: only list/tuple literals of integers, ``+`` and ``*`` are accepted."""

    def value(node: ast.AST):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(ast.dump(node))

    try:
        layers = value(ast.parse(str(spec), mode="eval").body)
        layers = [tuple(int(v) for v in layer) for layer in layers]
        if not layers or any(len(layer) != 3 for layer in layers):
            raise ValueError("not a list of (dim, kernel, stride)")
    except (SyntaxError, ValueError, TypeError) as err:
        raise SpecError(f"{where} = {spec!r} is not a list of (dim, kernel, stride) triples ({err}).") from None
    return layers


def activation(name: str, where: str) -> str:
    try:
        return ACTIVATIONS[str(name)]
    except KeyError:
        raise SpecError(f"{where} = {name!r}: d2v knows the fairseq activations {', '.join(ACTIVATIONS)}.") from None


def unsupported(where: str, problems: list[str]) -> None:
    """A SpecError listing the architecture features d2v does not implement."""
    if problems:
        raise SpecError(f"{where} uses features d2v's audio components do not implement: " + "; ".join(problems) + ".")


# --------------------------------------------------------------------------- the 1.0 backbone


def backbone_spec(m: ConfigReader) -> dict[str, Any]:
    """``feature_extractor`` + ``encoder`` of a ``data2vec_audio`` config (its own dropouts and
    masking; a fine-tuning importer overrides those with :func:`finetune_overrides`)."""
    where = m.where
    problems = []
    mode = m.get("extractor_mode", "default")
    if mode != "layer_norm":
        problems.append(f"{where}.extractor_mode={mode!r} (only 'layer_norm': a LayerNorm in every conv block)")
    depth = int(m.get("pos_conv_depth", 1))
    if depth <= 1:
        problems.append(f"{where}.pos_conv_depth={depth} (wav2vec 2.0's single weight-normed positional conv; "
                        f"d2v has data2vec's stack, pos_conv_depth > 1)")
    if m.get("layer_norm_first", False):
        problems.append(f"{where}.layer_norm_first=true (pre-LN; d2v's audio.transformer is post-LN)")
    layer_type = m.get("layer_type", "transformer")
    if layer_type != "transformer":
        problems.append(f"{where}.layer_type={layer_type!r} (only 'transformer')")
    unsupported(f"this fairseq data2vec_audio checkpoint ({where})", problems)

    layers = conv_layers(m.get("conv_feature_layers", DEFAULT_CONV), f"{where}.conv_feature_layers")
    dim = int(m.get("encoder_embed_dim", 768))
    conv_pos = int(m.get("conv_pos", 128))
    return {
        "feature_extractor": {
            "name": "audio.conv",
            "conv_dim": [c for c, _, _ in layers],
            "conv_kernel": [k for _, k, _ in layers],
            "conv_stride": [s for _, _, s in layers],
            "conv_bias": bool(m.get("conv_bias", False)),
            "activation": "gelu",
            "dim": dim,
            "feat_proj_dropout": float(m.get("dropout_input", 0.0)),
            "layer_norm_eps": LAYER_NORM_EPS,
        },
        "encoder": {
            "name": "audio.transformer",
            "dim": dim,
            "layers": int(m.get("encoder_layers", 12)),
            "heads": int(m.get("encoder_attention_heads", 12)),
            "ffn_dim": int(m.get("encoder_ffn_embed_dim", 3072)),
            "activation": activation(m.get("activation_fn", "gelu"), f"{where}.activation_fn"),
            "dropout": float(m.get("dropout", 0.1)),
            "attention_dropout": float(m.get("attention_dropout", 0.1)),
            "activation_dropout": float(m.get("activation_dropout", 0.0)),
            "layerdrop": float(m.get("encoder_layerdrop", 0.0)),
            "layer_norm_eps": LAYER_NORM_EPS,
            "num_pos_conv_layers": depth,
            "pos_conv_kernel": max(3, conv_pos // depth),
            "pos_conv_groups": int(m.get("conv_pos_groups", 16)),
            **masking_fields(m),
        },
    }


def masking_fields(m: ConfigReader) -> dict[str, Any]:
    """fairseq's ``apply_mask`` settings as the encoder's SpecAugment (time spans to the mask
    embedding with at least one span per utterance, as data2vec_audio asks; channel spans to 0)."""
    notes = m.notes
    selection = m.get("mask_selection", "static")
    if selection != "static" or m.get("mask_other", 0) or m.get("no_mask_overlap", False):
        notes.append(f"{m.where}: mask_selection={selection!r}/mask_other/no_mask_overlap are not reproduced; "
                     f"d2v draws fixed-length ('static') time spans")
    if m.get("mask_channel_before", False):
        notes.append(f"{m.where}.mask_channel_before=true: d2v masks channels after the time spans")
    return {
        "mask_time_prob": float(m.get("mask_prob", 0.65)),
        "mask_time_length": int(m.get("mask_length", 10)),
        "mask_time_min_masks": 1,
        "mask_feature_prob": float(m.get("mask_channel_prob", 0.0)),
        "mask_feature_length": int(m.get("mask_channel_length", 10)),
        "mask_feature_min_masks": 0,
    }


def backbone_names(spec: dict[str, Any]) -> list[Rename]:
    """Every backbone weight of the fairseq model the spec describes, fairseq names relative to
    the ``data2vec_audio`` model."""
    fe, enc = spec["feature_extractor"], spec["encoder"]
    table: list[Rename] = []
    for i in range(len(fe["conv_dim"])):
        table += linear(f"feature_extractor.conv_layers.{i}.conv", f"feature_extractor.conv_layers.{i}.0",
                        bias=fe["conv_bias"])
        table += linear(f"feature_extractor.conv_layers.{i}.norm", f"feature_extractor.conv_layers.{i}.2.1")
    table += linear("feature_extractor.norm", "layer_norm")
    table += linear("feature_extractor.proj", "post_extract_proj")
    table.append(Rename("encoder.mask_embedding", "mask_emb"))
    for j in range(enc["num_pos_conv_layers"]):
        table += linear(f"encoder.pos_conv.layers.{j}.conv", f"encoder.pos_conv.{j}.0")
    table += linear("encoder.layer_norm", "encoder.layer_norm")
    for layer in range(enc["layers"]):
        ours, theirs = f"encoder.layers.{layer}", f"encoder.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            table += linear(f"{ours}.attention.{proj}", f"{theirs}.self_attn.{proj}")
        table += linear(f"{ours}.attention_norm", f"{theirs}.self_attn_layer_norm")
        table += linear(f"{ours}.ffn.fc1", f"{theirs}.fc1")
        table += linear(f"{ours}.ffn.fc2", f"{theirs}.fc2")
        table += linear(f"{ours}.ffn_norm", f"{theirs}.final_layer_norm")
    return table


# --------------------------------------------------------------------------- the 1.0 objective


def target_spec(m: ConfigReader, exotic_norms: tuple[str, ...] = ("batch_norm_target_layer", "group_norm_target_layer"),
                ) -> tuple[dict[str, Any] | None, str | None]:
    """d2v's ``data2vec`` target for fairseq's target options (shared by 1.0 and 2.0, whose
    config has no ``group_norm_target_layer``), or ``None`` and the reason when d2v has no
    equivalent."""
    per_layer = [name for key, name in (("instance_norm_target_layer", "instance"), ("layer_norm_target_layer", "layer"))
                 if m.get(key, False)]
    final = [name for key, name in (("layer_norm_targets", "layer"), ("instance_norm_targets", "instance"))
             if m.get(key, False)]
    exotic = [key for key in exotic_norms if m.get(key, False)]
    if exotic or len(per_layer) > 1 or len(final) > 1:
        return None, (f"its target normalisation ({', '.join(exotic + per_layer + final)}) has no d2v equivalent "
                      f"(d2v's data2vec target: one of instance/layer per layer, one of them on the average)")
    beta = float(m.get("loss_beta", 0.0))
    scale = m.get("loss_scale", None)
    return {
        "name": "data2vec",
        "top_k": int(m.get("average_top_k_layers", 8)),
        "layer_norm": per_layer[0] if per_layer else None,
        "final_norm": final[0] if final else None,
        "loss": "l2" if beta == 0 else "smooth_l1",
        **({} if beta == 0 else {"beta": beta}),
        "loss_scale": None if scale is None else float(scale),
        "reduction": "sum",
    }, None


def objective_spec(m: ConfigReader, max_update: int = 0) -> tuple[dict[str, Any] | None, str | None]:
    """The ``data2vec`` objective of a ``data2vec_audio`` config (or ``None`` and why not);
    ``max_update`` (``cfg.optimization``) is fairseq's default EMA anneal length."""
    target, reason = target_spec(m)
    if target is None:
        return None, reason
    layers = int(m.get("encoder_layers", 12))
    if target["top_k"] > layers:  # fairseq's extract_features(min_layer=layers - k) then returns every layer
        m.notes.append(f"{m.where}.average_top_k_layers={target['top_k']} exceeds the {layers} layers; fairseq "
                       f"averages all {layers}, and so does the imported objective")
        target["top_k"] = layers
    if m.get("mask_dropout", 0.0):
        m.notes.append(f"{m.where}.mask_dropout={m.get('mask_dropout', 0.0)} is not reproduced by d2v's span masking")
    return {
        "name": "data2vec",
        "target": target,
        "masking": {"name": "span", "mask_prob": float(m.get("mask_prob", 0.65)),
                    "mask_length": int(m.get("mask_length", 10)), "min_masks": 1,
                    "require_same_masks": bool(m.get("require_same_masks", True)),
                    "no_overlap": bool(m.get("no_mask_overlap", False))},
        "head_layers": 1,
        # fairseq's make_ema_teacher: ema_layers_only implies ema_transformer_only
        "ema_scope": "encoder" if (m.get("ema_layers_only", True) or m.get("ema_transformer_only", True)) else "all",
        "copy_keys": ["pos_conv"] if m.get("ema_layers_only", True) else [],
        "ema_decay": float(m.get("ema_decay", 0.999)),
        "ema_end_decay": float(m.get("ema_end_decay", 0.9999)),
        "ema_anneal_end_step": int(m.get("ema_anneal_end_step", max_update) or 0),
        "target_feature": "ffn",
        "min_target_std": float(m.get("min_target_var", 0.1)),
        "min_pred_std": float(m.get("min_pred_var", 0.01)),
    }, None
