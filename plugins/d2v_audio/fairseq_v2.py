"""fairseq's data2vec 2.0 speech model (``data2vec_multi``, AUDIO) in d2v terms: spec and names.

fairseq (``examples/data2vec/models/data2vec2.py``, ``modalities/{audio,base,modules}.py``),
``A = modality_encoders.AUDIO``::

    A.local_encoder.conv_layers.{i}.0 / .2.1   conv + LayerNorm    -> feature_extractor.conv_layers.{i}.conv / .norm
    A.project_features.1 / .2                  LayerNorm, Linear   -> feature_extractor.norm / .proj
    A.relative_positional_encoder.{j+1}.0      grouped Conv1d      -> encoder.pos_conv.layers.{j}.conv
    A.context_encoder.norm                     LN before the blocks -> encoder.layer_norm
    A.context_encoder.blocks.{i}               prenet AltBlocks    -> encoder.layers.{i}
    blocks.{i}                                 shared AltBlocks    -> encoder.layers.{prenet_depth + i}
      norm1, attn.qkv (fused), attn.proj, mlp.fc1, mlp.fc2, norm2  -> attention_norm, attention.{q,k,v}_proj,
                                                                     attention.out_proj, ffn.fc1, ffn.fc2, ffn_norm
    A.alibi_scale (L|1, 1, H|1, 1, 1)          learned ALiBi scale -> encoder.alibi_scale (L|1, H|1)
    A.decoder.blocks.{i}.0, A.decoder.proj     conv decoder        -> decoder.blocks.{i}.conv, decoder.proj
    _ema.* (EMA of the model minus the conv stack and decoder)     -> teacher.model.*

The AltBlocks are post-LN (``layer_norm_first: false``): the same computation as d2v's
``EncoderLayer``. Unlike data2vec 1.0, padded frames are not zeroed before the positional conv
(``zero_padded_frames: false``) and there is no mask embedding: masked frames are zeroed
(``encoder_zero_mask``), so ``encoder.mask_embedding`` is imported as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from d2v.interop.fairseq import ConfigReader
from d2v.interop.fairseq_multi import DECODER_FIELDS, MODALITY_FIELDS, UnsupportedObjective, encoder_blocks, objective
from d2v.interop.fairseq_names import Rename, linear, reshaped
from d2v_audio.fairseq_v1 import conv_layers, unsupported

AUDIO = "modality_encoders.AUDIO."

#: ``Data2VecMultiConfig`` fields (examples/data2vec/models/data2vec2.py)
#: ``D2vModalityConfig`` + ``D2vAudioConfig`` fields (modalities/base.py, modalities/audio.py)
AUDIO_FIELDS = MODALITY_FIELDS + (
    "extractor_mode", "feature_encoder_spec", "conv_pos_width", "conv_pos_groups", "conv_pos_depth", "conv_pos_pre_ln",
)
#: ``D2vDecoderConfig`` fields (modalities/modules.py)
#: where the backbone's weights live (the decoder is the objective's), and the settings that say how many there are
BACKBONE_PREFIXES = tuple(AUDIO + part for part in ("local_encoder.", "project_features.", "relative_positional_encoder.",
                                                    "context_encoder.", "alibi_scale")) + ("blocks.",)
#: the ``audio.transformer`` module of each ``AltBlock`` part (the fused qkv split in three)
BLOCK = {"norm1": "attention_norm", "attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
         "attn.proj": "attention.out_proj", "norm2": "ffn_norm", "mlp.fc1": "ffn.fc1", "mlp.fc2": "ffn.fc2"}
SHAPE_SETTINGS = ("depth, modalities.audio.feature_encoder_spec, prenet_depth, conv_pos_depth, use_alibi_encoder, "
                  "layer_norm_first")
DEFAULT_CONV = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"


def has_audio(weights: dict[str, Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix + AUDIO) for k in weights)


@dataclass
class AudioArch:
    """The architecture of a data2vec 2.0 speech model, read once from its config."""

    conv: list[tuple[int, int, int]]
    dim: int
    heads: int
    ffn_dim: int
    depth: int              # shared blocks
    prenet: int             # modality blocks before them
    norm_eps: float
    pos_depth: int
    pos_kernel: int
    pos_groups: int
    alibi: bool
    alibi_scale_init: float
    alibi_learned_scale: bool
    alibi_per_head: bool
    alibi_per_layer: bool
    dropout: float
    attention_dropout: float
    activation_dropout: float
    layerdrop: float
    audio: ConfigReader     # cfg.model.modalities.audio
    decoder: ConfigReader   # cfg.model.modalities.audio.decoder

    @property
    def layers(self) -> int:
        return self.prenet + self.depth


def read_arch(m: ConfigReader, finetune: ConfigReader | None = None) -> AudioArch:
    """Read and check the architecture; ``finetune`` is the ``wav2vec_ctc`` config around it
    (whose ``update_alibi`` decides whether the ALiBi scale keeps learning)."""
    audio = m.section("modalities", known=("audio", "image", "text")).section("audio", known=AUDIO_FIELDS)
    decoder = audio.section("decoder", known=DECODER_FIELDS)
    where = m.where
    problems = []
    if m.get("layer_norm_first", False):
        problems.append(f"{where}.layer_norm_first=true (pre-LN blocks; d2v's audio.transformer is post-LN)")
    if not m.get("norm_affine", True):
        problems.append(f"{where}.norm_affine=false (LayerNorms without weight and bias)")
    if audio.get("extractor_mode", "layer_norm") != "layer_norm":
        problems.append(f"{audio.where}.extractor_mode={audio.get('extractor_mode', 'layer_norm')!r} (only 'layer_norm')")
    if audio.get("conv_pos_pre_ln", False):
        problems.append(f"{audio.where}.conv_pos_pre_ln=true (a LayerNorm before the positional conv)")
    if audio.get("learned_alibi", False):
        problems.append(f"{audio.where}.learned_alibi=true (a learned ALiBi bias table; d2v learns the scale only)")
    if int(audio.get("num_extra_tokens", 0)):
        problems.append(f"{audio.where}.num_extra_tokens={audio.get('num_extra_tokens', 0)} (extra leading tokens)")
    unsupported(f"this fairseq data2vec_multi checkpoint ({where})", problems)

    dim = int(m.get("embed_dim", 768))
    depth = int(m.get("depth", 8))
    prenet = int(audio.get("prenet_depth", 4))
    pos_depth = int(audio.get("conv_pos_depth", 5))
    dropout = float(m.get("encoder_dropout", 0.1))
    layerdrop = float(m.get("layerdrop", 0.0))
    _note_training_differences(m, audio, prenet, dropout, layerdrop, finetune is not None)
    learned = bool(audio.get("learned_alibi_scale", False))
    if finetune is not None:
        learned = bool(finetune.get("update_alibi", True))
    return AudioArch(
        conv=conv_layers(audio.get("feature_encoder_spec", DEFAULT_CONV), f"{audio.where}.feature_encoder_spec"),
        dim=dim,
        heads=int(m.get("num_heads", 12)),
        ffn_dim=int(dim * float(m.get("mlp_ratio", 4.0))),
        depth=depth,
        prenet=prenet,
        norm_eps=float(m.get("norm_eps", 1e-6)),
        pos_depth=pos_depth,
        pos_kernel=max(3, int(audio.get("conv_pos_width", 95)) // pos_depth),
        pos_groups=int(audio.get("conv_pos_groups", 16)),
        alibi=bool(audio.get("use_alibi_encoder", False)),
        alibi_scale_init=float(audio.get("alibi_scale", 1.0)),
        alibi_learned_scale=learned,
        alibi_per_head=bool(audio.get("learned_alibi_scale_per_head", False)),
        alibi_per_layer=bool(audio.get("learned_alibi_scale_per_layer", False)),
        dropout=dropout,
        attention_dropout=float(m.get("attention_dropout", 0.1)),
        activation_dropout=float(m.get("activation_dropout", 0.0)),
        layerdrop=layerdrop,
        audio=audio,
        decoder=decoder,
    )


def _note_training_differences(m: ConfigReader, audio: ConfigReader, prenet: int, dropout: float, layerdrop: float,
                               finetune: bool) -> None:
    """fairseq has separate knobs where d2v's encoder has one; say when they differ (training
    only: none of them changes what the imported model computes in eval mode)."""
    notes = m.notes
    if finetune:  # fairseq's wav2vec_ctc overrides all of them with its dropout / layerdrop
        return
    prenet_layerdrop = float(audio.get("prenet_layerdrop", 0.0))
    if prenet and prenet_layerdrop != layerdrop:
        notes.append(f"the {prenet} prenet blocks use LayerDrop {prenet_layerdrop} in fairseq and the shared blocks "
                     f"{layerdrop}; d2v's encoder uses one value for all layers: {layerdrop}")
    prenet_dropout = float(audio.get("prenet_dropout", 0.0))
    if prenet_dropout != dropout:
        notes.append(f"fairseq drops out the positional conv output with prenet_dropout={prenet_dropout}; d2v uses "
                     f"the encoder dropout {dropout} there")
    post_mlp = float(m.get("post_mlp_drop", 0.1))
    if post_mlp != dropout:
        notes.append(f"post_mlp_drop={post_mlp} differs from encoder_dropout={dropout}; d2v uses {dropout} after "
                     f"both attention and FFN")
    if float(m.get("dropout_input", 0.0)):
        notes.append(f"dropout_input={m.get('dropout_input', 0.0)} (after the prenet) is not reproduced")
    rates = [float(m.get(k, 0.0)) for k in ("start_drop_path_rate", "end_drop_path_rate")]
    rates += [float(audio.get(k, 0.0)) for k in ("start_drop_path_rate", "end_drop_path_rate")]
    if any(rates):
        notes.append("drop_path (stochastic depth) rates are not reproduced: d2v's encoder has none")


def backbone_spec(arch: AudioArch) -> dict[str, Any]:
    return {
        "feature_extractor": {
            "name": "audio.conv",
            "conv_dim": [c for c, _, _ in arch.conv],
            "conv_kernel": [k for _, k, _ in arch.conv],
            "conv_stride": [s for _, _, s in arch.conv],
            "conv_bias": False,  # AudioEncoder builds its conv stack without bias
            "activation": "gelu",
            "dim": arch.dim,
            "feat_proj_dropout": 0.0,
            "layer_norm_eps": 1e-5,  # project_features' nn.LayerNorm
        },
        "encoder": {
            "name": "audio.transformer",
            "dim": arch.dim,
            "layers": arch.layers,
            "heads": arch.heads,
            "ffn_dim": arch.ffn_dim,
            "activation": "gelu",
            "dropout": arch.dropout,
            "attention_dropout": arch.attention_dropout,
            "activation_dropout": arch.activation_dropout,
            "layerdrop": arch.layerdrop,
            "layer_norm_eps": arch.norm_eps,
            "num_pos_conv_layers": arch.pos_depth,
            "pos_conv_kernel": arch.pos_kernel,
            "pos_conv_groups": arch.pos_groups,
            "alibi": arch.alibi,
            "alibi_scale_init": arch.alibi_scale_init,
            "alibi_learned_scale": arch.alibi_learned_scale,
            "alibi_scale_per_head": arch.alibi_per_head,
            "alibi_scale_per_layer": arch.alibi_per_layer,
            "zero_padded_frames": False,
            # pretraining masks by dropping frames (the objective); SpecAugment is for fine-tuning
            "mask_time_prob": 0.0,
            "mask_feature_prob": 0.0,
        },
    }




def backbone_names(arch: AudioArch) -> list[Rename]:
    """Every backbone weight, fairseq names relative to the ``data2vec_multi`` model."""
    table: list[Rename] = []
    for i in range(len(arch.conv)):
        table += linear(f"feature_extractor.conv_layers.{i}.conv", f"{AUDIO}local_encoder.conv_layers.{i}.0", bias=False)
        table += linear(f"feature_extractor.conv_layers.{i}.norm", f"{AUDIO}local_encoder.conv_layers.{i}.2.1")
    table += linear("feature_extractor.norm", f"{AUDIO}project_features.1")
    table += linear("feature_extractor.proj", f"{AUDIO}project_features.2")
    for j in range(arch.pos_depth):
        table += linear(f"encoder.pos_conv.layers.{j}.conv", f"{AUDIO}relative_positional_encoder.{j + 1}.0")
    table += linear("encoder.layer_norm", f"{AUDIO}context_encoder.norm")
    table += encoder_blocks(AUDIO, arch.prenet, arch.depth, BLOCK)
    if arch.alibi:
        rows = arch.layers if arch.alibi_per_layer else 1
        cols = arch.heads if arch.alibi_per_head else 1
        settings = (f"learned_alibi_scale_per_layer={arch.alibi_per_layer}, "
                    f"learned_alibi_scale_per_head={arch.alibi_per_head}, {arch.layers} layers, {arch.heads} heads "
                    f"in {arch.audio.where}")
        table.append(Rename("encoder.alibi_scale", f"{AUDIO}alibi_scale", reshaped(rows, cols), settings))
    return table


def dropped(weights: dict[str, Tensor], prefix: str, notes: list[str]) -> set[str]:
    """Tensors fairseq itself discards when it fine-tunes (an old learned ``encoder_mask``)."""
    name = f"{prefix}{AUDIO}encoder_mask"
    if name in weights:
        notes.append(f"{name} is dropped, as fairseq's fine-tuning drops it (zero_mask: false)")
        return {name}
    return set()


def mask_embedding(arch: AudioArch) -> Tensor:
    """data2vec 2.0 has no mask embedding: zeros (fine-tuning's SpecAugment then zeroes masked
    frames, where fairseq fills them with N(0, mask_noise_std) noise)."""
    return torch.zeros(arch.dim)


# --------------------------------------------------------------------------- the 2.0 objective


def objective_spec(m: ConfigReader, arch: AudioArch, max_update: int = 0) -> tuple[dict[str, Any] | None, str | None]:
    """The ``data2vec2`` objective of the config, or ``None`` and the reason (the backbone
    still imports); ``max_update`` (``cfg.optimization``) is fairseq's default EMA anneal length."""
    if float(m.get("recon_loss", 0.0)) or float(m.get("cls_loss", 0.0)):
        return None, "it adds a recon_loss/cls_loss that needs parts audio models do not have"
    copy_keys: list[str] = []
    if bool(m.get("ema_encoder_only", True)):  # the teacher reuses the student's positional conv, prenet and ALiBi scale
        copy_keys = ["pos_conv", "layer_norm", "alibi_scale"] + [f"layers.{i}" for i in range(arch.prenet)]
    try:
        return objective(m, arch.audio, arch.decoder, depth=arch.depth, max_update=max_update,
                         ema_scope="encoder", copy_keys=copy_keys), None
    except UnsupportedObjective as err:
        return None, str(err)


def teacher_names(table: list[Rename], encoder_only: bool) -> tuple[list[Rename], list[Rename]]:
    """``(from the EMA, from the student)`` entries of ``teacher.model.*``: fairseq's EMA holds
    the whole encoder under the model's names, or (``ema_encoder_only``) the shared blocks
    alone under ``{i}.*`` -- then the rest of the teacher is the student's own."""
    ema, student = [], []
    for r in table:
        if not r.ours.startswith("encoder."):
            continue
        ours = "teacher.model." + r.ours[len("encoder."):]
        if not encoder_only:
            ema.append(replace(r, ours=ours))
        elif r.theirs.startswith("blocks."):
            ema.append(replace(r, ours=ours, theirs=r.theirs[len("blocks."):]))
        else:
            student.append(Rename(ours, r.ours))
    return ema, student
