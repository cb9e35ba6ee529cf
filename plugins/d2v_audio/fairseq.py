"""fairseq's speech checkpoints -> d2v models, without fairseq (``fairseq_converter`` components).

``d2v convert model.pt OUT`` (and ``--to hf``, and ``model.init.checkpoint: model.pt``) asks
every converter whether it ``accepts`` the checkpoint; these three read:

* ``data2vec_audio`` (data2vec 1.0 pretraining): a ``pretrain`` spec with the ``data2vec``
  objective -- ``final_proj`` is its regression head and ``_ema`` its teacher, so continued
  pretraining starts from fairseq's teacher (:mod:`d2v_audio.fairseq_v1`);
* ``data2vec_multi`` with an ``AUDIO`` encoder (data2vec 2.0 pretraining): a ``pretrain`` spec
  with the ``data2vec2`` objective, decoder and teacher included (:mod:`d2v_audio.fairseq_v2`);
* ``wav2vec_ctc`` over either (fine-tuned CTC): a ``finetune`` spec with the ``ctc`` head
  (:mod:`d2v_audio.fairseq_ctc`).

When the objective cannot be expressed in d2v (an exotic target normalisation, no regression
head in the file) the backbone alone is imported and a note says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from d2v.api.errors import SpecError
from d2v.interop.fairseq import ConfigReader, FairseqCheckpoint, FairseqImport, read_fairseq_checkpoint
from d2v.interop.fairseq_multi import MULTI_FIELDS, decoder_names
from d2v.interop.fairseq_names import Rename, collect, collect_ema, prefixed, rebased, refuse_unaccounted
from d2v_audio import fairseq_ctc, fairseq_v1, fairseq_v2

EMA = "(its EMA teacher, model['_ema'])"


# --------------------------------------------------------------------------- data2vec 1.0


class Data2VecAudioImporter:
    """fairseq ``data2vec_audio`` (data2vec 1.0 speech pretraining)."""

    def accepts(self, ckpt: FairseqCheckpoint) -> bool:
        return ckpt.name == "data2vec_audio"

    def convert(self, ckpt: FairseqCheckpoint, options: dict[str, Any]) -> FairseqImport:
        notes: list[str] = []
        m = ConfigReader(ckpt.model_cfg, "cfg.model", fairseq_v1.DATA2VEC_AUDIO_FIELDS, notes)
        spec = fairseq_v1.backbone_spec(m)
        table = fairseq_v1.backbone_names(spec)
        where = f"fairseq data2vec_audio checkpoint '{ckpt.path}'"
        state, consumed = collect(table, ckpt.model, where)
        refuse_unaccounted(ckpt.model, consumed, fairseq_v1.BACKBONE_PREFIXES, where, fairseq_v1.SHAPE_SETTINGS)

        objective, reason = fairseq_v1.objective_spec(m, ckpt.max_update)
        head = next((p for p in ("final_proj", "final_proj.0") if f"{p}.weight" in ckpt.model), None)
        if objective is not None and head is None:
            objective, reason = None, "the checkpoint has no regression head (final_proj)"
        if objective is None:
            notes.append(f"imported the backbone only (no data2vec objective): {reason}")
        else:
            head_state, head_used = collect([Rename("regression_head.weight", f"{head}.weight"),
                                             Rename("regression_head.bias", f"{head}.bias")], ckpt.model, str(ckpt.path))
            teacher_state, teacher_used = self._teacher(ckpt, table, objective["ema_scope"], state, notes)
            state.update(head_state)
            state.update(teacher_state)
            consumed |= head_used | teacher_used
            state["num_updates"] = _zero_step()
            spec["objective"] = objective
        m.finish()
        return FairseqImport(spec=spec, task="pretrain", state_dict=state, consumed=consumed, notes=notes)

    @staticmethod
    def _teacher(ckpt: FairseqCheckpoint, table: list[Rename], scope: str, student: dict[str, Tensor],
                 notes: list[str]) -> tuple[dict[str, Tensor], set[str]]:
        """``teacher.model.*``: fairseq's EMA of the encoder (``ema_transformer_only``, the
        ``_ema`` names are the encoder's own) or of the whole model."""
        if scope == "encoder":
            teacher_table = rebased(table, "encoder.", "teacher.model.", "encoder.", "")
        else:
            teacher_table = prefixed(table, "teacher.model.")
        if not ckpt.ema:
            notes.append("the checkpoint holds no EMA teacher (model['_ema']); the teacher starts as a copy of the "
                         "student, as fairseq's make_ema_teacher does")
            source = {r.ours: student[_student_name(r.ours, scope)] for r in teacher_table}
            used: set[str] = set()
        else:
            source, used = collect_ema(teacher_table, ckpt.ema, f"fairseq checkpoint '{ckpt.path}' {EMA}")
        if scope == "encoder":  # the mask embedding belongs to the model in fairseq; the teacher never uses it
            source["teacher.model.mask_embedding"] = student["encoder.mask_embedding"].clone()
        return source, used


def _student_name(teacher_name: str, scope: str) -> str:
    rest = teacher_name[len("teacher.model."):]
    return f"encoder.{rest}" if scope == "encoder" else rest


def _zero_step() -> Tensor:
    """The objective's update counter (``import_fairseq`` then sets it to the checkpoint's
    ``optimizer_history`` count, so the EMA decay schedule continues where fairseq stopped)."""
    return torch.zeros((), dtype=torch.long)


# --------------------------------------------------------------------------- data2vec 2.0


class Data2VecMultiAudioImporter:
    """fairseq ``data2vec_multi`` with an ``AUDIO`` modality encoder (data2vec 2.0 speech)."""

    def accepts(self, ckpt: FairseqCheckpoint) -> bool:
        return ckpt.name == "data2vec_multi" and fairseq_v2.has_audio(ckpt.model, "")

    def convert(self, ckpt: FairseqCheckpoint, options: dict[str, Any]) -> FairseqImport:
        notes: list[str] = []
        m = ConfigReader(ckpt.model_cfg, "cfg.model", MULTI_FIELDS, notes)
        arch = fairseq_v2.read_arch(m)
        spec = fairseq_v2.backbone_spec(arch)
        table = fairseq_v2.backbone_names(arch)
        where = f"fairseq data2vec_multi checkpoint '{ckpt.path}'"
        state, consumed = collect(table, ckpt.model, where)
        refuse_unaccounted(ckpt.model, consumed, fairseq_v2.BACKBONE_PREFIXES, where, fairseq_v2.SHAPE_SETTINGS)
        state["encoder.mask_embedding"] = fairseq_v2.mask_embedding(arch)
        consumed |= fairseq_v2.dropped(ckpt.model, "", notes)

        if ckpt.ema:
            objective, reason = fairseq_v2.objective_spec(m, arch, ckpt.max_update)
        else:  # fairseq builds its teacher from the student only at step 0; a saved run has one
            objective, reason = None, "the checkpoint holds no EMA teacher (model['_ema'])"
        if objective is None:
            notes.append(f"imported the backbone only (no data2vec2 objective): {reason}")
        else:
            decoder = decoder_names(f"{fairseq_v2.AUDIO}decoder", objective["decoder_layers"],
                                    objective["decoder_projection_layers"])
            decoder_state, decoder_used = collect(decoder, ckpt.model, str(ckpt.path))
            encoder_only = bool(objective["copy_keys"])  # ema_encoder_only: the teacher copies the rest
            from_ema, from_student = fairseq_v2.teacher_names(table, encoder_only)
            teacher_state, teacher_used = collect_ema(from_ema, ckpt.ema, f"fairseq checkpoint '{ckpt.path}' {EMA}")
            teacher_state.update({r.ours: state[r.theirs].clone() for r in from_student})
            teacher_state["teacher.model.mask_embedding"] = state["encoder.mask_embedding"].clone()
            state.update(decoder_state)
            state.update(teacher_state)
            consumed |= decoder_used | teacher_used
            state["num_updates"] = _zero_step()
            spec["objective"] = objective
        m.finish()
        return FairseqImport(spec=spec, task="pretrain", state_dict=state, consumed=consumed, notes=notes)


# --------------------------------------------------------------------------- fine-tuned CTC


class Wav2VecCtcImporter:
    """fairseq ``wav2vec_ctc`` over a data2vec 1.0 (``data2vec_audio``) or 2.0
    (``data2vec_multi``) speech model."""

    def accepts(self, ckpt: FairseqCheckpoint) -> bool:
        return ckpt.name == "wav2vec_ctc" and _pretrained_name(ckpt) in ("data2vec_audio", "data2vec_multi")

    def convert(self, ckpt: FairseqCheckpoint, options: dict[str, Any]) -> FairseqImport:
        notes: list[str] = []
        outer = ConfigReader(ckpt.model_cfg, "cfg.model", fairseq_ctc.CTC_FIELDS, notes)
        inner_cfg = _pretrained_cfg(ckpt)
        where = "cfg.model.w2v_args.model"
        encoder_fields, fe_fields = fairseq_ctc.finetune_settings(outer)
        if inner_cfg.get("_name") not in ("data2vec_audio", "data2vec_multi"):
            raise SpecError(f"'{ckpt.path}' fine-tunes a fairseq {inner_cfg.get('_name')!r} model ({where}._name); d2v "
                            f"reads CTC fine-tunings of data2vec_audio and data2vec_multi speech models.")
        if inner_cfg.get("_name") == "data2vec_audio":
            inner = ConfigReader(inner_cfg, where, fairseq_v1.DATA2VEC_AUDIO_FIELDS, notes)
            spec = fairseq_v1.backbone_spec(inner)
            table = fairseq_v1.backbone_names(spec)
            version = fairseq_v1
            extra: dict[str, Tensor] = {}
            dropped: set[str] = set()
        else:
            inner = ConfigReader(inner_cfg, where, MULTI_FIELDS, notes)
            arch = fairseq_v2.read_arch(inner, finetune=outer)
            spec = fairseq_v2.backbone_spec(arch)
            table = fairseq_v2.backbone_names(arch)
            version = fairseq_v2
            extra = {"encoder.mask_embedding": fairseq_v2.mask_embedding(arch)}
            dropped = fairseq_v2.dropped(ckpt.model, fairseq_ctc.PREFIX, notes)
            if encoder_fields["apply_spec_augment"] and not outer.get("zero_mask", False):
                notes.append("fairseq fills the frames it masks while fine-tuning with N(0, mask_noise_std) noise "
                             "(zero_mask: false); d2v's SpecAugment puts the zero mask embedding there")
        spec["encoder"].update(encoder_fields)
        spec["feature_extractor"].update(fe_fields)

        ctc_where = f"fairseq wav2vec_ctc checkpoint '{ckpt.path}'"
        state, consumed = collect(prefixed(table, "", fairseq_ctc.PREFIX), ckpt.model, ctc_where)
        refuse_unaccounted(ckpt.model, consumed, tuple(fairseq_ctc.PREFIX + p for p in version.BACKBONE_PREFIXES),
                           ctc_where, f"{where}: {version.SHAPE_SETTINGS}")
        state.update(extra)
        consumed |= dropped
        head = fairseq_ctc.head_weights(ckpt.model, outer)
        state.update(head)
        consumed |= {f"{fairseq_ctc.PROJ}.weight", f"{fairseq_ctc.PROJ}.bias"}
        vocab = fairseq_ctc.vocabulary(head["head.proj.weight"].shape[0], options.get("dict"), notes)
        spec["head"] = fairseq_ctc.head_spec(outer, ckpt.cfg, vocab)
        freeze = fairseq_ctc.frozen_prefixes(outer)
        if freeze:
            spec["freeze"] = freeze
        outer.finish()
        inner.finish()
        return FairseqImport(spec=spec, task="finetune", state_dict=state, consumed=consumed, notes=notes)


def _pretrained_cfg(ckpt: FairseqCheckpoint) -> dict[str, Any]:
    """The pretrained model's config inside a fine-tuning config (``cfg.model.w2v_args.model``,
    or a legacy flat ``Namespace``); without ``w2v_args``, the config of the pretrained file at
    ``cfg.model.w2v_path``, where fairseq itself reads it from."""
    args = ckpt.model_cfg.get("w2v_args")
    if not isinstance(args, dict):
        args = _config_at_w2v_path(ckpt)
    if isinstance(args.get("model"), dict):
        return args["model"]
    if args.get("arch"):
        return {"_name": args["arch"], **args}
    raise SpecError(f"'{ckpt.path}': cfg.model.w2v_args has no 'model' section.")


def _config_at_w2v_path(ckpt: FairseqCheckpoint) -> dict[str, Any]:
    w2v_path = ckpt.model_cfg.get("w2v_path")
    if w2v_path and Path(str(w2v_path)).is_file():
        return read_fairseq_checkpoint(str(w2v_path)).cfg
    guess = {"data2vec_multi": "data2vec 2.0", "data2vec_audio": "data2vec 1.0 or wav2vec 2.0"}[_pretrained_name(ckpt)]
    raise SpecError(
        f"'{ckpt.path}' is a fairseq wav2vec_ctc fine-tuning (of a {guess} speech model, by its weights) whose "
        f"cfg.model.w2v_args -- the pretrained model's config, which fairseq stores when it fine-tunes -- is "
        f"missing, so the encoder's architecture (depth, width, conv stack, ALiBi) is unknown. fairseq would read it "
        f"from the pretrained checkpoint at cfg.model.w2v_path ({str(w2v_path)!r}), which is not a file here: put "
        f"that pretrained checkpoint at that path and convert again."
    )


def _pretrained_name(ckpt: FairseqCheckpoint) -> str:
    """``data2vec_audio`` or ``data2vec_multi``: named by ``w2v_args``, else told by the weights."""
    args = ckpt.model_cfg.get("w2v_args")
    if isinstance(args, dict):
        model = args.get("model") if isinstance(args.get("model"), dict) else args
        name = model.get("_name") or model.get("arch")
        if name:
            return str(name)
    if fairseq_v2.has_audio(ckpt.model, fairseq_ctc.PREFIX):
        return "data2vec_multi"
    return "data2vec_audio" if any(k.startswith(fairseq_ctc.PREFIX + "encoder.layers.") for k in ckpt.model) else ""
