"""fairseq data2vec text checkpoints -> d2v (``d2v convert x.pt OUT``, ``model.init.checkpoint: x.pt``).

Four ``fairseq_converter`` components (names and shapes: :mod:`d2v_text.fairseq_v1`,
:mod:`d2v_text.fairseq_v2`):

* ``data2vec_text``: data2vec 1.0 text (``cfg.model._name: data2vec_text``, e.g. ``nlp_base.pt``)
  and RoBERTa-style GLUE fine-tunings of it (``data2vec_text`` or ``roberta`` with
  ``classification_heads.<name>.*``) -> the text backbone; with its regression head a ``pretrain``
  spec with the ``data2vec`` objective (head, EMA teacher, update count), so pretraining goes on;
  with ``encoder.lm_head.*`` a ``masked_lm`` head, with a classification head ``text_classification``.
* ``data2vec_multi_text``: data2vec 2.0 text pretraining (``data2vec_multi`` with
  ``modality_encoders.TEXT.*``) -> a ``pretrain`` spec with the ``data2vec2`` objective: student,
  ``Decoder1d`` and the EMA teacher.
* ``data2vec_text_classification``: a data2vec 2.0 GLUE fine-tuning -> ``text_classification``.
  fairseq's ``sentence_prediction`` task saves it without the backbone config (only ``model_path``):
  the config then comes from the pretraining checkpoint (``--backbone PATH``, or ``model_path``
  where that file exists), checked against the classifier's tensors.

The tokenizer is not in the checkpoint: fairseq's ``dict.txt`` maps GPT-2 BPE ids to model ids
(``<s>=0 <pad>=1 </s>=2 <unk>=3``, then the dictionary's lines, then ``<mask>``), and data2vec
used RoBERTa's, so Hugging Face's RoBERTa tokenizer files (``vocab.json`` + ``merges.txt`` of
``roberta-base`` or ``facebook/data2vec-text-base``) give the same ids. ``--dict dict.txt``
checks that the dictionary's size matches the embedding table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from d2v.api.errors import SpecError
from d2v.interop.fairseq import ConfigReader, FairseqCheckpoint, FairseqImport, read_fairseq_checkpoint
from d2v.interop.fairseq_multi import MULTI_FIELDS
from d2v.interop.fairseq_names import collect, collect_ema, prefixed
from d2v_text import fairseq_v1 as v1
from d2v_text import fairseq_v2 as v2

TOKENIZER_NOTE = ("the tokenizer is not in a fairseq checkpoint: data2vec text used RoBERTa's dictionary (dict.txt, "
                  "GPT-2 BPE; <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last), so the Hugging Face RoBERTa tokenizer files "
                  "(vocab.json + merges.txt of roberta-base or facebook/data2vec-text-base) give the same ids: set "
                  "data.processor.tokenizer to a directory holding them")
ROBERTA_NAMES = ("roberta", "roberta_base", "roberta_large", "roberta_prenorm", "xlm", "roberta_enc_dec")
#: the top-level sections of a fairseq cfg (a fine-tuning run's pretrained_model_args holds one)
CFG_SECTIONS = ("_name", "common", "common_eval", "distributed_training", "dataset", "optimization", "optimizer",
                "lr_scheduler", "scoring", "bpe", "tokenizer", "ema", "task", "model", "criterion", "checkpoint",
                "generation", "eval_lm", "interactive", "bmuf", "job_logging_cfg", "job_launcher_cfg")
CLASSIFIER_FIELDS = ("pooler_dropout", "pooler_activation_fn", "quant_noise_pq", "quant_noise_pq_block_size",
                     "spectral_norm_classification_head", "model_path", "no_pretrained_weights",
                     "pretrained_model_args", "max_positions")


def check_dictionary(options: dict[str, Any], vocab: int, notes: list[str]) -> None:
    """``options["dict"]`` (fairseq's dict.txt): its 4 specials + lines + ``<mask>`` must be the
    embedding's row count."""
    path = options.get("dict")
    if not path:
        return
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"--dict {path}: no such file.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    size = 4 + len(lines) + 1
    if size != vocab:
        raise SpecError(f"--dict {path}: {len(lines)} entries + 4 specials + <mask> = {size} ids, but the checkpoint's "
                        f"embedding has {vocab} rows; this dictionary does not belong to the checkpoint.")
    notes.append(f"dictionary {path.name}: {size} ids, matching the embedding table")


def classification_head(weights: dict[str, Tensor], prefix: str, dim: int, activation: str, dropout: float,
                        options: dict[str, Any], notes: list[str]) -> tuple[dict[str, Any], dict[str, Tensor], set[str]]:
    """fairseq's ``RobertaClassificationHead`` (``<s>`` -> dropout -> dense -> tanh -> dropout ->
    out_proj) -> the ``text_classification`` head: spec, state, fairseq names used. With several
    heads, ``options["head"]`` picks one (default: the first by name)."""
    names = sorted({k[len(prefix):].split(".", 1)[0] for k in weights if k.startswith(prefix)})
    chosen = options.get("head") or names[0]
    if chosen not in names:
        raise SpecError(f"classification head '{chosen}' is not in the checkpoint; it has {', '.join(names)}.")
    if len(names) > 1:
        notes.append(f"the checkpoint has {len(names)} classification heads ({', '.join(names)}); '{chosen}' was imported")
    base = f"{prefix}{chosen}."
    parts = [f"{base}{m}.{k}" for m in ("dense", "out_proj") for k in ("weight", "bias")]
    missing = [p for p in parts if p not in weights]
    if missing:
        raise SpecError(f"classification head '{chosen}' lacks {', '.join(missing)}.")
    if activation != "tanh":
        raise SpecError(f"pooler_activation_fn {activation!r}: d2v's text_classification head uses tanh (fairseq's "
                        f"default).")
    inner = int(weights[base + "dense.weight"].shape[0])
    if inner != dim:
        raise SpecError(f"classification head '{chosen}' has inner_dim {inner}; d2v's text_classification head is "
                        f"{dim} wide (fairseq's default inner_dim = embed_dim).")
    num_labels = int(weights[base + "out_proj.weight"].shape[0])
    spec = {"name": "text_classification", "num_labels": num_labels, "classifier_dropout": float(dropout)}
    state = {f"head.{m}.{k}": weights[f"{base}{m}.{k}"].float() for m in ("dense", "out_proj") for k in ("weight", "bias")}
    return spec, state, set(parts)


# --------------------------------------------------------------------------- 1.0


class Data2VecTextImporter:
    """fairseq ``data2vec_text`` (and RoBERTa-layout) checkpoints -> the d2v text backbone (+ head)."""

    def accepts(self, ckpt: FairseqCheckpoint) -> bool:
        layout = v1.P + "embed_tokens.weight" in ckpt.model
        return layout and (ckpt.name == "data2vec_text" or ckpt.name in ROBERTA_NAMES)

    def convert(self, ckpt: FairseqCheckpoint, options: dict[str, Any]) -> FairseqImport:
        notes: list[str] = []
        roberta = ckpt.name != "data2vec_text"
        model = ConfigReader(ckpt.model_cfg, "cfg.model",
                             known=v1.ROBERTA_FIELDS if roberta else v1.DATA2VEC_TEXT_FIELDS, notes=notes)
        arch = v1.TextV1Arch(model, roberta)
        weights = ckpt.model
        spec = arch.backbone_spec(weights)
        state, consumed = collect(v1.backbone_names(arch, weights), weights, str(ckpt.path), v1.WHAT)
        consumed |= {k for k in weights if k == v1.P + "version"}
        vocab = spec["feature_extractor"]["vocab_size"]
        check_dictionary(options, vocab, notes)

        task = "pretrain"
        if any(k.startswith("classification_heads.") for k in weights):
            head, head_state, used = classification_head(weights, "classification_heads.", arch.dim,
                                                         arch.pooler_activation, arch.pooler_dropout, options, notes)
            spec["head"] = head
            state.update(head_state)
            consumed |= used
            task = "finetune"
            lm_head = {k for k in weights if k.startswith("encoder.lm_head.")}
            if lm_head:  # RoBERTa fine-tuning keeps the pretraining LM head beside the classifier
                consumed |= lm_head
                notes.append("encoder.lm_head.* (the pretraining LM head a RoBERTa fine-tuning keeps) is left out: "
                             "the model is the classifier")
            leftovers = {k for k in weights if k.startswith("encoder.regression_head.")} | {
                f"_ema.{k}" for k in ckpt.ema}
            if leftovers:  # data2vec_text fine-tuned as itself keeps (and updates) its pretraining parts
                consumed |= leftovers
                notes.append("encoder.regression_head.* and the EMA teacher (encoder._ema), which a data2vec_text "
                             "fine-tuning keeps from pretraining, are left out: the model is the classifier")
        elif "encoder.lm_head.weight" in weights:
            head_state, tied, used = self.lm_head(weights, state["feature_extractor.word_embeddings.weight"])
            spec["head"] = {"name": "masked_lm", "layer_norm_eps": v1.LAYER_NORM_EPS, "activation": "gelu",
                            "tie_word_embeddings": tied}
            state.update(head_state)
            consumed |= used
            task = "finetune"
            notes.append(f"encoder.lm_head (RobertaLMHead) -> masked_lm head ({'tied to' if tied else 'untied from'} "
                         f"the word embeddings)")
        if task == "pretrain" and not roberta:
            objective, used = self.objective(ckpt, model, arch, state, notes)
            if objective is not None:
                spec["objective"] = objective
                consumed |= used
        notes.append("fairseq zeroes the embeddings of padding tokens before the first layer; outputs at real tokens "
                     "are the same, outputs at padding positions are not used")
        notes += arch.notes()
        notes.append(TOKENIZER_NOTE)
        model.finish()
        return FairseqImport(spec=spec, task=task, state_dict=state, consumed=consumed, notes=notes)

    @staticmethod
    def objective(ckpt: FairseqCheckpoint, model: ConfigReader, arch: v1.TextV1Arch, state: dict[str, Tensor],
                  notes: list[str]) -> tuple[dict[str, Any] | None, set[str]]:
        """data2vec 1.0's pretraining parts: the regression head and the EMA teacher (``encoder._ema``),
        added to ``state``; the objective spec (``None`` with a note when d2v has no equivalent) and
        the fairseq names used."""
        head = v1.regression_head_names(ckpt.model)
        if head is None:
            return None, set()
        objective, reason = v1.objective_spec(model, v1.head_layers(head), ckpt.max_update)
        if objective is None:
            notes.append(f"imported the backbone only (no data2vec objective): {reason}")
            return None, set()
        head_state, used = collect(head, ckpt.model, str(ckpt.path))
        state.update(head_state)
        teacher = v1.teacher_names(arch, ckpt.ema)
        if ckpt.ema:
            teacher_state, _ = collect_ema(teacher, ckpt.ema, f"{ckpt.path} (its EMA teacher, model['encoder._ema'])",
                                           v1.WHAT)
            state.update(teacher_state)
            used |= {f"_ema.{k}" for k in ckpt.ema}  # the teacher's tensors and its version buffer
        else:
            notes.append("the checkpoint holds no EMA teacher (encoder._ema); the teacher starts as a copy of the "
                         "student, as fairseq's make_ema_teacher does")
            state.update({r.ours: state[r.ours[len("teacher.model."):]].clone() for r in teacher})
        state["num_updates"] = torch.zeros((), dtype=torch.long)
        task = ckpt.cfg.get("task") or {}
        notes.append(f"the data2vec objective regresses the positions the processor masks: set data.processor.masking "
                     f"to {{name: bert, mask_prob: {task.get('mask_prob', 0.15)}, mask_length: "
                     f"{task.get('mask_multiple_length', 1)}, replace_prob: "
                     f"{1 - float(task.get('leave_unmasked_prob', 0.1)) - float(task.get('random_token_prob', 0.1)):g}, "
                     f"random_prob: {task.get('random_token_prob', 0.1)}}} as fairseq's masked_lm task had it")
        return objective, used

    @staticmethod
    def lm_head(weights: dict[str, Tensor], embeddings: Tensor) -> tuple[dict[str, Tensor], bool, set[str]]:
        """RobertaLMHead ``dense -> gelu -> layer_norm -> weight (V x D) + bias``; tied when its
        weight is the word embedding table (fairseq shares the tensor)."""
        parts = {"head.dense.weight": "encoder.lm_head.dense.weight", "head.dense.bias": "encoder.lm_head.dense.bias",
                 "head.layer_norm.weight": "encoder.lm_head.layer_norm.weight",
                 "head.layer_norm.bias": "encoder.lm_head.layer_norm.bias", "head.bias": "encoder.lm_head.bias",
                 "head.decoder.weight": "encoder.lm_head.weight"}
        missing = [theirs for theirs in parts.values() if theirs not in weights]
        if missing:
            raise SpecError(f"the LM head is incomplete: {', '.join(missing)} missing.")
        state = {ours: weights[theirs].float() for ours, theirs in parts.items()}
        tied = torch.equal(state["head.decoder.weight"], embeddings)
        if tied:
            state["head.decoder.weight"] = embeddings
        return state, tied, set(parts.values())


# --------------------------------------------------------------------------- 2.0 pretraining


class Data2VecMultiTextImporter:
    """fairseq ``data2vec_multi`` text pretraining checkpoints -> d2v ``data2vec2`` pretraining models."""

    def accepts(self, ckpt: FairseqCheckpoint) -> bool:
        return ckpt.name == "data2vec_multi" and any(k.startswith(v2.M) for k in ckpt.model)

    def convert(self, ckpt: FairseqCheckpoint, options: dict[str, Any]) -> FairseqImport:
        notes: list[str] = []
        model = ConfigReader(ckpt.model_cfg, "cfg.model", known=MULTI_FIELDS, notes=notes)
        arch = v2.TextV2Arch(model)
        where = str(ckpt.path)
        v2.check_shape(ckpt.model, arch, where, "cfg.model")
        spec = arch.backbone(ckpt.model)
        spec["objective"] = v2.objective_spec(arch, ckpt.max_update)
        student, consumed = collect(v2.backbone_names(arch), ckpt.model, where, v2.WHAT)
        decoder, used = v2.decoder_tensors(ckpt.model, spec["objective"], where)
        teacher, ema_used = v2.teacher_tensors(ckpt.ema, arch, student, where, notes)
        state = {**student, **decoder, **teacher, "num_updates": v2.zero_step()}
        consumed |= used | ema_used
        check_dictionary(options, spec["feature_extractor"]["vocab_size"], notes)
        if not model.get("ema_encoder_only", True) and ckpt.ema:
            notes.append("ema_encoder_only: false -- the teacher's Transformer layers come from _ema.blocks.*")
        notes += arch.notes()
        notes.append(TOKENIZER_NOTE)
        model.finish()
        return FairseqImport(spec=spec, task="pretrain", state_dict=state, consumed=consumed, notes=notes)


# --------------------------------------------------------------------------- 2.0 fine-tuned


class Data2VecTextClassificationImporter:
    """fairseq ``data2vec_text_classification`` (GLUE over ``data2vec_multi``) -> ``text_classification``."""

    def accepts(self, ckpt: FairseqCheckpoint) -> bool:
        return ckpt.name == "data2vec_text_classification" and any(k.startswith("model." + v2.M) for k in ckpt.model)

    def convert(self, ckpt: FairseqCheckpoint, options: dict[str, Any]) -> FairseqImport:
        notes: list[str] = []
        top = ConfigReader(ckpt.model_cfg, "cfg.model", known=CLASSIFIER_FIELDS, notes=notes)
        local = {k[len("model."):]: v for k, v in ckpt.model.items() if k.startswith("model.")}
        inner = self.backbone_config(ckpt, top, local, options, notes)
        if inner.values.get("_name") not in (None, "data2vec_multi"):
            raise SpecError(f"{ckpt.path}: data2vec_text_classification over '{inner.values.get('_name')}' -- only "
                            f"data2vec_multi (data2vec 2.0) backbones import here.")
        arch = v2.TextV2Arch(inner)
        v2.check_shape(local, arch, str(ckpt.path), inner.where)
        spec = arch.backbone(local)
        state, consumed = collect(prefixed(v2.backbone_names(arch), theirs="model."), ckpt.model, str(ckpt.path),
                                  v2.WHAT)
        head, head_state, head_used = classification_head(
            ckpt.model, "classification_heads.", arch.dim, str(top.get("pooler_activation_fn", "tanh")),
            float(top.get("pooler_dropout", 0.0)), options, notes)
        spec["head"] = head
        state.update(head_state)
        consumed |= head_used
        if top.get("quant_noise_pq", 0) or top.get("spectral_norm_classification_head", False):
            raise SpecError("quant_noise_pq / spectral_norm_classification_head are not supported by d2v's "
                            "text_classification head.")
        check_dictionary(options, spec["feature_extractor"]["vocab_size"], notes)
        notes += arch.notes()
        notes.append(TOKENIZER_NOTE)
        top.finish()
        return FairseqImport(spec=spec, task="finetune", state_dict=state, consumed=consumed, notes=notes)

    @staticmethod
    def backbone_config(ckpt: FairseqCheckpoint, top: ConfigReader, weights: dict[str, Tensor],
                        options: dict[str, Any], notes: list[str]) -> ConfigReader:
        """The backbone's ``cfg.model``: ``pretrained_model_args.model`` when the file has it;
        otherwise (fairseq's ``sentence_prediction`` saves only ``model_path``) the config of the
        pretraining checkpoint given as ``options["backbone"]`` (``--backbone``) or found at
        ``model_path``. The tensors give depth and widths, not the head count or LayerNorm eps."""
        pretrained = top.section("pretrained_model_args", known=CFG_SECTIONS)
        if pretrained.values:
            return pretrained.section("model", known=MULTI_FIELDS)
        model_path = top.values.get("model_path")
        given = options.get("backbone")
        source = Path(given) if given else Path(str(model_path)) if model_path else None
        if source is None or not source.is_file():
            depth, dim, ffn = v2.tensor_shape(weights)
            where = (f"--backbone {given} does not exist" if given else
                     f"its model_path '{model_path}' is not here" if model_path else "it has no model_path")
            raise SpecError(
                f"{ckpt.path}: a data2vec 2.0 text classifier saved by fairseq's sentence_prediction task keeps no "
                f"backbone config (cfg.model.pretrained_model_args is null) and {where}. Its tensors give depth "
                f"{depth}, width {dim} and FFN width {ffn}, but not the number of attention heads or the LayerNorm "
                f"eps: pass the data2vec 2.0 pretraining checkpoint it was fine-tuned from, "
                f"d2v convert {ckpt.path} OUT --backbone PATH (fairseq's cfg.model.model_path).")
        backbone = read_fairseq_checkpoint(source)
        if backbone.name != "data2vec_multi":
            raise SpecError(f"backbone checkpoint {source}: cfg.model._name is '{backbone.name or '?'}', not "
                            f"data2vec_multi; pass the data2vec 2.0 pretraining checkpoint the classifier was "
                            f"fine-tuned from.")
        notes.append(f"cfg.model.pretrained_model_args is null (fairseq's sentence_prediction saves only model_path): "
                     f"the backbone's config was read from {source}")
        return ConfigReader(backbone.model_cfg, f"{source}: cfg.model", known=MULTI_FIELDS, notes=notes)
