"""fairseq's data2vec 1.0 text model (``data2vec_text``) and RoBERTa in d2v terms: spec and weight names.

Both keep a RoBERTa ``TransformerEncoder`` (fairseq/models/transformer/transformer_encoder.py,
fairseq/modules/transformer_layer.py) under ``encoder.sentence_encoder``::

    embed_tokens                       nn.Embedding(V, D, pad)      -> feature_extractor.word_embeddings
    embed_positions                    learned, rows = max + pad + 1 -> feature_extractor.position_embeddings
    layernorm_embedding (emb_layer_norm in old files)               -> feature_extractor.layer_norm
    layers.{i}.self_attn.{q,k,v,out}_proj                           -> encoder.layers.{i}.self_attention.*
    layers.{i}.self_attn_layer_norm                                 -> encoder.layers.{i}.attention_norm
    layers.{i}.fc1 / fc2 / final_layer_norm                         -> encoder.layers.{i}.ffn.fc1 / fc2 / ffn_norm
    version                            a buffer fairseq keeps for upgrades (dropped)

plus ``encoder.lm_head.{dense,layer_norm,weight,bias}`` (RobertaLMHead -> the ``masked_lm`` head),
``encoder.regression_head.*`` (data2vec's regression head -> the ``data2vec`` objective's
``regression_head``), ``encoder._ema`` (the EMA teacher of ``sentence_encoder`` -> ``teacher.model.*``) and
``classification_heads.<name>.{dense,out_proj}`` (RobertaClassificationHead -> ``text_classification``).
There is no token-type embedding (``type_vocab_size: 0``) and fairseq's LayerNorm eps is 1e-5.

``data2vec_text`` nests the encoder settings (``cfg.model.transformer.encoder.layers``);
RoBERTa's legacy config is flat (``cfg.model.encoder_layers``). :func:`read_arch` reads either.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from d2v.api.errors import SpecError
from d2v.interop.fairseq import ConfigReader
from d2v.interop.fairseq_names import Rename, linear, prefixed

P = "encoder.sentence_encoder."
LAYER_NORM_EPS = 1e-5  # fairseq's LayerNorm default
#: what the text importers' missing tensors are, in their errors
WHAT = "tensors of the text encoder its config describes"

#: ``Data2VecTextConfig`` fields (examples/data2vec/models/data2vec_text.py)
DATA2VEC_TEXT_FIELDS = (
    "max_positions", "head_layers", "transformer", "load_checkpoint_heads", "loss_beta", "loss_scale",
    "average_top_k_layers", "layer_norm_target_layer", "instance_norm_target_layer", "batch_norm_target_layer",
    "instance_norm_targets", "layer_norm_targets", "ema_decay", "ema_end_decay", "ema_anneal_end_step",
    "ema_transformer_layers_only",
)
#: ``TransformerConfig`` fields (fairseq/models/transformer/transformer_config.py)
TRANSFORMER_FIELDS = (
    "activation_fn", "dropout", "attention_dropout", "activation_dropout", "adaptive_input", "encoder",
    "max_source_positions", "decoder", "max_target_positions", "share_decoder_input_output_embed",
    "share_all_embeddings", "merge_src_tgt_embed", "no_token_positional_embeddings", "adaptive_softmax_cutoff",
    "adaptive_softmax_dropout", "adaptive_softmax_factor", "layernorm_embedding", "tie_adaptive_weights",
    "tie_adaptive_proj", "no_scale_embedding", "checkpoint_activations", "offload_activations",
    "no_cross_attention", "cross_self_attention", "quant_noise", "min_params_to_wrap", "char_inputs",
    "relu_dropout", "base_layers", "base_sublayers", "base_shuffle", "export", "no_decoder_final_norm",
)
ENCODER_FIELDS = ("embed_path", "embed_dim", "ffn_embed_dim", "layers", "attention_heads", "normalize_before",
                  "learned_pos", "layerdrop", "layers_to_keep", "xformers_att_config")
#: RoBERTa's flat fields (fairseq/models/roberta/model.py ``add_args`` / ``base_architecture``)
ROBERTA_FIELDS = (
    "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads", "activation_fn",
    "pooler_activation_fn", "encoder_normalize_before", "layernorm_embedding", "dropout", "attention_dropout",
    "activation_dropout", "pooler_dropout", "max_positions", "load_checkpoint_heads", "encoder_layerdrop",
    "encoder_layers_to_keep", "quant_noise_pq", "quant_noise_pq_block_size", "quant_noise_scalar",
    "untie_weights_roberta", "spectral_norm_classification_head", "min_params_to_wrap", "encoder_learned_pos",
    "no_token_positional_embeddings", "no_scale_embedding", "adaptive_input", "max_source_positions",
    "checkpoint_activations", "offload_activations", "encoder_embed_path", "layers_to_keep", "arch",
)
#: fairseq activation names -> d2v's (``gelu`` is exact in both, ``gelu_accurate`` the tanh form)
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_accurate": "gelu_new", "tanh": "tanh"}

LAYER_NAMES = (
    ("self_attn.q_proj", "self_attention.q_proj"), ("self_attn.k_proj", "self_attention.k_proj"),
    ("self_attn.v_proj", "self_attention.v_proj"), ("self_attn.out_proj", "self_attention.out_proj"),
    ("self_attn_layer_norm", "attention_norm"), ("fc1", "ffn.fc1"), ("fc2", "ffn.fc2"),
    ("final_layer_norm", "ffn_norm"),
)


class TextV1Arch:
    """The shape and regularisation of a RoBERTa-style text encoder, from either config layout."""

    def __init__(self, model: ConfigReader, roberta: bool):
        self.model = model
        if roberta:
            get = model.get
            self.layers = int(get("encoder_layers", 12))
            self.dim = int(get("encoder_embed_dim", 768))
            self.ffn_dim = int(get("encoder_ffn_embed_dim", 3072))
            self.heads = int(get("encoder_attention_heads", 12))
            self.activation = str(get("activation_fn", "gelu"))
            self.dropout = float(get("dropout", 0.1))
            self.attention_dropout = float(get("attention_dropout", 0.1))
            self.activation_dropout = float(get("activation_dropout", 0.0))
            self.normalize_before = bool(get("encoder_normalize_before", False))
            self.layernorm_embedding = bool(get("layernorm_embedding", True))
            self.no_scale_embedding = bool(get("no_scale_embedding", True))
            self.learned_pos = bool(get("encoder_learned_pos", True))
            self.no_positions = bool(get("no_token_positional_embeddings", False))
            self.layerdrop = float(get("encoder_layerdrop", 0.0))
            self.pooler_activation = str(get("pooler_activation_fn", "tanh"))
            self.pooler_dropout = float(get("pooler_dropout", 0.0))
        else:
            t = model.section("transformer", known=TRANSFORMER_FIELDS)
            e = t.section("encoder", known=ENCODER_FIELDS)
            self.layers = int(e.get("layers", 6))
            self.dim = int(e.get("embed_dim", 512))
            self.ffn_dim = int(e.get("ffn_embed_dim", 2048))
            self.heads = int(e.get("attention_heads", 8))
            self.activation = str(t.get("activation_fn", "relu"))
            self.dropout = float(t.get("dropout", 0.1))
            self.attention_dropout = float(t.get("attention_dropout", 0.0))
            self.activation_dropout = float(t.get("activation_dropout", 0.0))
            self.normalize_before = bool(e.get("normalize_before", False))
            self.layernorm_embedding = bool(t.get("layernorm_embedding", False))
            self.no_scale_embedding = bool(t.get("no_scale_embedding", False))
            self.learned_pos = bool(e.get("learned_pos", False))
            self.no_positions = bool(t.get("no_token_positional_embeddings", False))
            self.layerdrop = float(e.get("layerdrop", 0.0))
            # data2vec_text registers its classification heads with tanh and no dropout
            self.pooler_activation, self.pooler_dropout = "tanh", 0.0
        self.check()

    def check(self) -> None:
        where = self.model.where
        problems = []
        if self.normalize_before:
            problems.append("normalize_before: true (pre-LN; text.transformer is post-LN)")
        if not self.layernorm_embedding:
            problems.append("layernorm_embedding: false (text.embeddings always normalises the embeddings)")
        if not self.no_scale_embedding:
            problems.append("no_scale_embedding: false (embeddings scaled by sqrt(dim); d2v does not scale)")
        if self.no_positions or not self.learned_pos:
            problems.append("sinusoidal or no positions (text.embeddings has learned RoBERTa positions)")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation_fn {self.activation!r} (supported: {', '.join(ACTIVATIONS)})")
        if problems:
            raise SpecError(f"this fairseq text checkpoint ({where}) has settings d2v cannot reproduce: "
                            f"{'; '.join(problems)}.")

    def backbone_spec(self, weights: dict[str, Tensor]) -> dict[str, Any]:
        vocab, positions = shapes(weights, self.dim)
        return {
            "feature_extractor": {"name": "text.embeddings", "vocab_size": vocab, "max_position_embeddings": positions,
                                  "type_vocab_size": 0, "padding_idx": 1, "layer_norm_eps": LAYER_NORM_EPS,
                                  "dropout": self.dropout},
            "encoder": {"name": "text.transformer", "dim": self.dim, "layers": self.layers, "heads": self.heads,
                        "ffn_dim": self.ffn_dim, "activation": ACTIVATIONS[self.activation], "dropout": self.dropout,
                        "attention_dropout": self.attention_dropout, "layer_norm_eps": LAYER_NORM_EPS,
                        "add_pooling_layer": False},
        }

    def notes(self) -> list[str]:
        notes = []
        if self.activation_dropout:
            notes.append(f"activation_dropout {self.activation_dropout} (dropout inside the FFN) is not reproduced")
        if self.layerdrop:
            notes.append(f"encoder layerdrop {self.layerdrop} is not reproduced")
        return notes


def shapes(weights: dict[str, Tensor], dim: int, prefix: str = P, tokens: str = "embed_tokens.weight",
           positions: str = "embed_positions.weight") -> tuple[int, int]:
    """Vocabulary size and position rows, read from the embedding tables (what fairseq built
    from its dictionary and ``max_positions + padding_idx + 1``)."""
    missing = [prefix + n for n in (tokens, positions) if prefix + n not in weights]
    if missing:
        raise SpecError(f"the checkpoint lacks the embedding tables {', '.join(missing)}; is the file complete?")
    vocab, width = weights[prefix + tokens].shape
    if width != dim:
        raise SpecError(f"{prefix}{tokens} is {width} wide but the config says embed_dim {dim}; the config does "
                        f"not describe these weights.")
    return int(vocab), int(weights[prefix + positions].shape[0])


def embedding_names(prefix: str, norm: str = "layernorm_embedding") -> list[Rename]:
    """The token and position tables and their LayerNorm (``norm``) under ``prefix`` (1.0 and 2.0)."""
    return [Rename("feature_extractor.word_embeddings.weight", prefix + "embed_tokens.weight"),
            Rename("feature_extractor.position_embeddings.weight", prefix + "embed_positions.weight"),
            *linear("feature_extractor.layer_norm", prefix + norm)]


def embedding_norm(weights: dict[str, Tensor], prefix: str) -> str:
    """The embeddings' LayerNorm as the file names it: ``emb_layer_norm`` in older checkpoints
    (fairseq renames it to ``layernorm_embedding`` on load)."""
    return "emb_layer_norm" if f"{prefix}emb_layer_norm.weight" in weights else "layernorm_embedding"


def backbone_names(arch: TextV1Arch, weights: dict[str, Tensor], prefix: str = P) -> list[Rename]:
    """Every backbone tensor of the encoder ``arch`` describes (the LayerNorm named as in ``weights``)."""
    table = embedding_names(prefix, embedding_norm(weights, prefix))
    for i in range(arch.layers):
        for theirs, ours in LAYER_NAMES:
            table += linear(f"encoder.layers.{i}.{ours}", f"{prefix}layers.{i}.{theirs}")
    return table


# --------------------------------------------------------------------------- the 1.0 objective


def target_spec(model: ConfigReader) -> tuple[dict[str, Any] | None, str | None]:
    """d2v's ``data2vec`` target for ``Data2VecTextConfig``'s target options, or ``None`` and why.

    fairseq's text loss is ``sum(loss) * loss_scale``, or ``/ sqrt(D)`` when ``loss_scale <= 0``
    (d2v's ``loss_scale: null``)."""
    per_layer = [name for key, name in (("instance_norm_target_layer", "instance"), ("layer_norm_target_layer", "layer"))
                 if model.get(key, False)]
    final = [name for key, name in (("layer_norm_targets", "layer"), ("instance_norm_targets", "instance"))
             if model.get(key, False)]
    if model.get("batch_norm_target_layer", False) or len(per_layer) > 1 or len(final) > 1:
        return None, ("its target normalisation (batch norm, or two norms at one place) has no d2v equivalent "
                      "(d2v's data2vec target: instance or layer norm per layer, instance or layer norm on the average)")
    beta = float(model.get("loss_beta", 0.0))
    scale = model.get("loss_scale", None)
    return {"name": "data2vec", "top_k": int(model.get("average_top_k_layers", 8)),
            "layer_norm": per_layer[0] if per_layer else None, "final_norm": final[0] if final else None,
            "loss": "l2" if beta == 0 else "smooth_l1", **({} if beta == 0 else {"beta": beta}),
            "loss_scale": None if scale is None or float(scale) <= 0 else float(scale), "reduction": "sum"}, None


def objective_spec(model: ConfigReader, head_layers: int, max_update: int) -> tuple[dict[str, Any] | None, str | None]:
    """The ``data2vec`` objective of a ``data2vec_text`` config (or ``None`` and why not).

    The teacher reads the uncorrupted tokens through its own copy of the whole encoder
    (``ema_scope: all``); ``ema_transformer_layers_only`` copies the embeddings instead of averaging
    them. The processor masks the tokens (``data.processor.masking``), so the objective has no masking."""
    target, reason = target_spec(model)
    if target is None:
        return None, reason
    return {
        "name": "data2vec", "target": target, "head_layers": head_layers, "ema_scope": "all",
        "copy_keys": ["feature_extractor"] if model.get("ema_transformer_layers_only", True) else [],
        "ema_decay": float(model.get("ema_decay", 0.999)), "ema_end_decay": float(model.get("ema_end_decay", 0.9999)),
        "ema_anneal_end_step": int(model.get("ema_anneal_end_step", max_update) or max_update or 0),
        "target_feature": "ffn",
    }, None


def regression_head_names(weights: dict[str, Tensor]) -> list[Rename] | None:
    """The regression head: ``encoder.regression_head.{i}`` (old files: ``encoder.lm_head.{i}``,
    which fairseq renames on load); ``None`` when the file has none. One layer is d2v's plain
    ``Linear``, more keep the Sequential's indices."""
    for prefix in ("encoder.regression_head.", "encoder.lm_head."):
        indices = sorted({int(k[len(prefix):].split(".")[0]) for k in weights
                          if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()})
        if indices:
            if indices == [0]:
                return linear("regression_head", f"{prefix}0")
            return [r for i in indices for r in linear(f"regression_head.{i}", f"{prefix}{i}")]
    return None


def head_layers(table: list[Rename]) -> int:
    """How many Linear layers the stored head has (fairseq: Linear, GELU, Linear, ...)."""
    return len(table) // 2


def teacher_names(arch: TextV1Arch, ema: dict[str, Tensor]) -> list[Rename]:
    """``teacher.model.*`` from ``encoder._ema``: the EMA copy of ``sentence_encoder``, whose
    names :func:`d2v.interop.fairseq.read_fairseq_checkpoint` prefixes with ``encoder.``."""
    return prefixed(backbone_names(arch, ema, prefix="encoder."), ours="teacher.model.")
