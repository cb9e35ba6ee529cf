"""fairseq's CTC fine-tuning (``wav2vec_ctc``) in d2v terms: the letters, the head, the
fine-tuning settings.

The checkpoint holds ``w2v_encoder.w2v_model.*`` (a ``data2vec_audio`` or ``data2vec_multi``
model, described by the nested config ``cfg.model.w2v_args``) and ``w2v_encoder.proj`` (the
output layer), but not the letters: those are the task's target ``Dictionary``, built from
``dict.ltr.txt``. fairseq's Dictionary puts ``<s>`` (0), ``<pad>`` (1), ``</s>`` (2), ``<unk>``
(3) first, then one symbol per line of the file; fairseq's CTC criterion and decoders use id 0
as the blank. d2v's CTC vocabulary calls the blank ``<pad>`` (Hugging Face's convention), so the
imported vocabulary keeps fairseq's ids and swaps the two names -- what Hugging Face's own
conversion script does -- and the output rows stay in fairseq's order.

Fine-tuning settings (dropouts, LayerDrop, SpecAugment) come from the outer ``cfg.model``
(fairseq writes them over the pretrained model's values when it builds the encoder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from d2v.api.errors import SpecError
from d2v.interop.fairseq import ConfigReader
from d2v_heads.speech.ctc_vocab import BOS, LIBRISPEECH_TOKENS, PAD

#: ``Wav2Vec2AsrConfig`` + ``Wav2Vec2CtcConfig`` fields (fairseq/models/wav2vec/wav2vec2_asr.py)
CTC_FIELDS = (
    "w2v_path", "no_pretrained_weights", "dropout_input", "final_dropout", "dropout", "attention_dropout",
    "activation_dropout", "apply_mask", "mask_length", "mask_prob", "mask_selection", "mask_other", "no_mask_overlap",
    "mask_min_space", "require_same_masks", "mask_dropout", "mask_channel_length", "mask_channel_prob",
    "mask_channel_selection", "mask_channel_other", "no_mask_channel_overlap", "freeze_finetune_updates",
    "feature_grad_mult", "layerdrop", "drop_path", "mask_channel_min_space", "mask_channel_before", "normalize",
    "update_alibi", "data", "w2v_args", "offload_activations", "min_params_to_wrap", "checkpoint_activations",
    "ddp_backend", "zero_mask", "load_ema", "layer_decay", "layer_type", "adp_num", "adp_dim", "adp_act_fn",
    "adp_trf_idx", "freeze_regex", "blank_weight", "blank_mode",
)
#: fairseq ``Dictionary`` specials, in id order
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
PREFIX = "w2v_encoder.w2v_model."
PROJ = "w2v_encoder.proj"


def read_dictionary(path: str | Path) -> list[str]:
    """The symbols of a fairseq dictionary file (``<symbol> <count> [#fairseq:overwrite]`` per
    line) in fairseq's id order, specials first."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise SpecError(f"--dict '{path}': cannot read the fairseq dictionary ({err.strerror or err}).") from None
    symbols = list(FAIRSEQ_SPECIALS)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.rstrip().rsplit(" ", 1)
        overwrite = len(parts) == 2 and parts[1] == "#fairseq:overwrite"
        if overwrite:
            parts = parts[0].rsplit(" ", 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise SpecError(f"--dict '{path}' line {number}: expected '<symbol> <count>' as in fairseq's "
                            f"dict.ltr.txt, got {line!r}.")
        symbol = parts[0]
        if symbol in symbols:
            if not overwrite:
                raise SpecError(f"--dict '{path}' line {number}: symbol {symbol!r} appears twice (fairseq refuses "
                                f"this too unless the line ends with #fairseq:overwrite).")
            continue
        symbols.append(symbol)
    return symbols


def ctc_tokens(fairseq_symbols: list[str]) -> list[str]:
    """d2v token names for fairseq's output rows: the blank (row 0, fairseq's ``<s>``) is named
    ``<pad>`` and row 1 (fairseq's ``<pad>``, never predicted) ``<s>``."""
    tokens = list(fairseq_symbols)
    tokens[0], tokens[1] = PAD, BOS
    return tokens


def vocabulary(num_outputs: int, dict_path: str | None, notes: list[str]) -> str | list[str]:
    """The CTC head's ``vocab`` for a projection with ``num_outputs`` rows."""
    if dict_path:
        symbols = read_dictionary(dict_path)
        if len(symbols) != num_outputs:
            raise SpecError(
                f"--dict '{dict_path}' gives {len(symbols)} symbols (4 fairseq specials + {len(symbols) - 4} lines) "
                f"but the checkpoint's output layer {PROJ} has {num_outputs} rows; pass the dictionary the model "
                f"was fine-tuned with."
            )
        tokens = ctc_tokens(symbols)
        return "librispeech" if tuple(tokens) == LIBRISPEECH_TOKENS else tokens
    if num_outputs == len(LIBRISPEECH_TOKENS):
        notes.append(
            "no --dict given: the 32 outputs are read as fairseq's LibriSpeech letter dictionary "
            "(dict.ltr.txt: | E T A O N I H S R D L U M W C F G Y P B V K ' X J Q Z), which every released "
            "data2vec CTC model uses; blank = id 0"
        )
        return "librispeech"
    raise SpecError(
        f"this CTC checkpoint has {num_outputs} outputs, and fairseq checkpoints do not store their letters. Pass "
        f"the dictionary it was fine-tuned with: d2v convert CKPT.pt OUT --dict dict.ltr.txt (model.init.checkpoint "
        f"cannot take one: convert first, then point model.init.checkpoint at the converted directory)."
    )


def head_spec(outer: ConfigReader, cfg: dict[str, Any], vocab: str | list[str]) -> dict[str, Any]:
    criterion = cfg.get("criterion") or {}
    zero_infinity = bool(criterion.get("zero_infinity", False)) if criterion.get("_name") == "ctc" else False
    return {"name": "ctc", "vocab": vocab, "final_dropout": float(outer.get("final_dropout", 0.0)),
            "ctc_loss_reduction": "sum", "ctc_zero_infinity": zero_infinity}


def head_weights(weights: dict[str, Tensor], outer: ConfigReader) -> dict[str, Tensor]:
    """``head.proj`` from ``w2v_encoder.proj``, with fairseq's decode-time ``blank_weight``
    (``blank_mode: add``) folded into the blank's bias."""
    missing = [f"{PROJ}.{n}" for n in ("weight", "bias") if f"{PROJ}.{n}" not in weights]
    if missing:
        raise SpecError(f"this wav2vec_ctc checkpoint lacks its output layer ({', '.join(missing)}).")
    weight = weights[f"{PROJ}.weight"].detach().clone().float()
    bias = weights[f"{PROJ}.bias"].detach().clone().float()
    blank_weight = float(outer.get("blank_weight", 0.0))
    if blank_weight:
        mode = outer.get("blank_mode", "add")
        if mode == "add":
            bias[0] += blank_weight
            outer.notes.append(f"cfg.model.blank_weight={blank_weight} (blank_mode add) is folded into the blank's bias")
        else:
            outer.notes.append(f"cfg.model.blank_weight={blank_weight} with blank_mode={mode!r} is not reproduced "
                               f"(it sets the blank logit to a constant when decoding)")
    return {"head.proj.weight": weight.contiguous(), "head.proj.bias": bias.contiguous()}


def finetune_settings(outer: ConfigReader) -> tuple[dict[str, Any], dict[str, Any]]:
    """Encoder and feature-extractor fields set by the fine-tuning config (its defaults are
    ``Wav2Vec2AsrConfig``'s)."""
    notes = outer.notes
    if outer.get("mask_selection", "static") != "static" or outer.get("mask_other", 0):
        notes.append("cfg.model.mask_selection/mask_other: d2v draws fixed-length ('static') time spans")
    if outer.get("freeze_finetune_updates", 0):
        notes.append(f"cfg.model.freeze_finetune_updates={outer.get('freeze_finetune_updates', 0)}: d2v trains the "
                     f"whole model from the first update; freeze parts with model.freeze if you need it")
    encoder = {
        "dropout": float(outer.get("dropout", 0.0)),
        "attention_dropout": float(outer.get("attention_dropout", 0.0)),
        "activation_dropout": float(outer.get("activation_dropout", 0.0)),
        "layerdrop": float(outer.get("layerdrop", 0.0)),
        "apply_spec_augment": bool(outer.get("apply_mask", False)),
        "mask_time_prob": float(outer.get("mask_prob", 0.5)),
        "mask_time_length": int(outer.get("mask_length", 10)),
        "mask_time_min_masks": 1,
        "mask_feature_prob": float(outer.get("mask_channel_prob", 0.0)),
        "mask_feature_length": int(outer.get("mask_channel_length", 10)),
        "mask_feature_min_masks": 0,
    }
    feature_extractor = {"feat_proj_dropout": float(outer.get("dropout_input", 0.0))}
    return encoder, feature_extractor


def frozen_prefixes(outer: ConfigReader) -> list[str]:
    """``feature_grad_mult: 0`` runs fairseq's conv stack without gradients: ``model.freeze``."""
    mult = float(outer.get("feature_grad_mult", 0.0))
    if 0.0 < mult < 1.0:
        outer.notes.append(f"cfg.model.feature_grad_mult={mult}: d2v does not scale the conv stack's gradients")
    return ["feature_extractor.conv_layers"] if mult == 0.0 else []
