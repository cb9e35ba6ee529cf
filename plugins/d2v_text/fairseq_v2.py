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

from d2v.api.errors import SpecError
from d2v.interop.fairseq import ConfigReader
from d2v.interop.fairseq_multi import (DECODER_FIELDS, MODALITY_FIELDS, decoder_names, encoder_blocks,
                                       ema_holds_blocks_only, objective)
from d2v.interop.fairseq_names import Rename, collect, collect_ema, rebased
from d2v_text.fairseq_v1 import LAYER_NORM_EPS, embedding_names, shapes

M = "modality_encoders.TEXT."
LOCAL = M + "local_encoder."

# D2vTextConfig's own fields (modalities/text.py); the shared ones are in d2v.interop.fairseq_multi
TEXT_FIELDS = MODALITY_FIELDS + (
    "max_source_positions", "learned_pos", "dropout", "no_scale_embedding", "layernorm_embedding",
    "no_token_positional_embeddings",
)
#: the ``text.transformer`` module of each ``AltBlock`` part (the fused qkv split in three)
BLOCK = {"norm1": "attention_norm",
         "attn.qkv": ("self_attention.q_proj", "self_attention.k_proj", "self_attention.v_proj"),
         "attn.proj": "self_attention.out_proj", "norm2": "ffn_norm", "mlp.fc1": "ffn.fc1", "mlp.fc2": "ffn.fc2"}
#: what the 2.0 text importers' missing tensors are, in their errors
WHAT = "tensors of the data2vec 2.0 text model"


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


def tensor_shape(weights: dict[str, Tensor]) -> tuple[int, int, int]:
    """Depth, width and FFN width as the tensors (fairseq names, no prefix) hold them."""
    depth = len({k.split(".")[1] for k in weights if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    table = weights.get(LOCAL + "embed_tokens.weight")
    fc1 = weights.get("blocks.0.mlp.fc1.weight")
    return depth, int(table.shape[1]) if table is not None else 0, int(fc1.shape[0]) if fc1 is not None else 0


def check_shape(weights: dict[str, Tensor], arch: TextV2Arch, where: str, config: str) -> None:
    """A SpecError when the config (``config`` names it) describes another model than the tensors."""
    depth, dim, ffn = tensor_shape(weights)
    said = (arch.depth, arch.dim, int(arch.dim * arch.mlp_ratio))
    if (depth, dim, ffn) != said:
        raise SpecError(f"{where}: {config} describes depth {said[0]}, width {said[1]}, FFN width {said[2]}, but the "
                        f"checkpoint's tensors have depth {depth}, width {dim}, FFN width {ffn}; the config belongs "
                        f"to another model (for a classifier: pass the pretraining checkpoint it was fine-tuned from).")


def backbone_names(arch: TextV2Arch) -> list[Rename]:
    """Every backbone tensor (no decoder), fairseq names relative to the ``data2vec_multi`` model."""
    return embedding_names(LOCAL) + encoder_blocks(M, 0, arch.depth, BLOCK)  # no prenet (checked above)


def decoder_tensors(weights: dict[str, Tensor], objective: dict[str, Any],
                    where: str) -> tuple[dict[str, Tensor], set[str]]:
    """``Decoder1d`` (``M.decoder.*``) as the ``objective`` node describes it."""
    prefix = M + "decoder."
    if not any(name.startswith(prefix) for name in weights):
        raise SpecError(f"{where}: no decoder tensors ({prefix}*) -- not a data2vec 2.0 text pretraining checkpoint "
                        f"with its Decoder1d (fine-tuned files drop it; they import as data2vec_text_classification).")
    table = decoder_names(M + "decoder", objective["decoder_layers"], objective["decoder_projection_layers"])
    return collect(table, weights, where, WHAT)


def objective_spec(arch: TextV2Arch, max_update: int) -> dict[str, Any]:
    """The ``data2vec2`` objective node of a ``data2vec_multi`` text config (the teacher shares
    the student's embeddings: only the blocks are averaged)."""
    return objective(arch.model, arch.text, arch.decoder, depth=arch.depth, max_update=max_update,
                     cls_loss=0.0, ema_scope="encoder", copy_keys=[])


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
    blocks_only = ema_holds_blocks_only(ema)
    table = rebased(backbone_names(arch), "encoder.", "teacher.model.", "blocks.", "" if blocks_only else "blocks.")
    state, used = collect_ema(table, ema, f"{where} (_ema)", WHAT)
    if not blocks_only and arch.text.get("ema_local_encoder", False):
        notes.append("ema_local_encoder: fairseq's teacher has its own embeddings (_ema.modality_encoders.TEXT.*); "
                     "d2v's text teacher reuses the student's, so those are not imported")
    return state, used


def zero_step() -> Tensor:
    return torch.zeros((), dtype=torch.long)
