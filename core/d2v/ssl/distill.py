"""data2vec 1.0 self-distillation: a masked student regresses an EMA teacher's layer average.

::

    inputs --feature_extractor--> features --(mask -> mask embedding)--> encoder --> regression_head --> predictions
                                      |                                                        (masked positions)
                                      +--(clone, unmasked)--> teacher (EMA, eval, no_grad) --> target --> targets

* **student** = ``feature_extractor`` + ``encoder`` + ``regression_head`` (Linear D->D for
  audio; ``head_layers=2`` gives text's Linear(D->2D) -> GELU -> Linear(2D->D)). The names
  ``feature_extractor``/``encoder`` match :class:`d2v.spec.model.TaskModel`, so a pretraining
  checkpoint initialises a fine-tuning model by key.
* **teacher** = :class:`d2v.ssl.ema.EMATeacher` (fp32, eval mode, ``requires_grad=False``, saved in
  checkpoints, outside the optimizer) of the encoder only (``ema_scope="encoder"``, speech: it
  consumes the student's features cloned *before* masking, and the positional conv is copied,
  not averaged -- ``copy_keys``) or of feature extractor + encoder (``ema_scope="all"``,
  vision 1.0 / text: it reads the raw input, or ``batch["teacher_inputs"]`` if present).
* **text**: the processor BERT-masks the tokens itself (``batch["inputs"]`` corrupted,
  ``batch["teacher_inputs"]`` the original, ``batch["corrupted_mask"]`` the selected
  positions); the student regresses those positions and its encoder masks nothing more.
* **decay** rises linearly ``ema_decay -> ema_end_decay`` over ``ema_anneal_end_step`` updates
  (:func:`d2v.ssl.ema.annealed_decay`); the runner calls :meth:`after_optimizer_step` after every
  update.
* **masks**: drawn in the data-loader workers (:meth:`SelfDistillation.make_batch_transform`),
  seeded by the batch's example ids, so they do not depend on the process or worker count.
* **loss**: the target's loss (``reduction="sum"``) divided by the number of masked tokens
  (``reduction="mean"`` targets are used as they are), with that number as ``sample_size``.
  The runner backpropagates ``loss * sample_size`` and divides the update's gradient by the
  total sample size of all its micro-batches on all processes: fairseq's per-update objective
  (its trainer divides the summed loss's gradient by the summed ``sample_size``).
* **collapse guard**: after ``collapse_check_after`` updates, a target std below
  ``min_target_std`` or a prediction std below ``min_pred_std`` raises
  :class:`TrainingCollapse` (fairseq's check, same defaults).

Shared with data2vec 2.0 (:mod:`d2v.ssl.distill2`): the base class :class:`EMASelfDistillation`
(teacher, decay schedule, loss, logs, collapse guard), :class:`PretrainOutput`,
:func:`sample_masks`, :func:`mask_seed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from d2v.ssl.batch_masks import Data2Vec2Masks, frame_lengths_fn, mask_seed, sample_masks
from d2v.ssl.ema import EMATeacher, annealed_decay
from d2v.api.errors import SpecError, TrainingCollapse
from d2v.api.interfaces import Encoder, EncoderOutput, FeatureExtractor, Target, _Output

__all__ = [
    "EMASelfDistillation",
    "PretrainOutput",
    "SelfDistillation",
    "TrainingCollapse",
    "check_collapse",
    "make_teacher",
    "regression_head",
    "run_teacher",
]

EMA_SCOPES = ("encoder", "all")
TARGET_FEATURES = ("ffn", "end")


@dataclass
class PretrainOutput(_Output):
    """What a pretraining objective returns.

    loss: the loss per masked token (see the module docstring).
    sample_size: how many positions were regressed (masked tokens, all clones); the runner
        weighs ``loss`` by it, so an update's gradient is its summed loss over its total
        sample size (``0``: a per-batch loss, every micro-batch weighted alike).
    logs: numbers worth logging: ``loss``, ``target_std``, ``pred_std``, ``ema_decay``,
        ``masked_frac``, and objective-specific extras; floats or 0-d tensors (left on the
        device so the step needs no host sync; the runner reads them once per logging window).
    """

    loss: Tensor
    sample_size: int = 0
    logs: dict[str, float | Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- shared helpers


def regression_head(dim: int, layers: int = 1) -> nn.Module:
    """data2vec's prediction head: ``layers=1`` Linear(D->D) (audio ``final_proj``); more layers
    widen to 2D first, GELU between (text's ``regression_head`` with ``head_layers=2``)."""
    if layers < 1:
        raise SpecError(f"head_layers must be >= 1, got {layers}.")
    if layers == 1:
        return nn.Linear(dim, dim)
    modules: list[nn.Module] = []
    width = dim
    for i in range(layers - 1):
        wider = 2 * width if i == 0 else width
        modules += [nn.Linear(width, wider), nn.GELU()]
        width = wider
    modules.append(nn.Linear(width, dim))
    return nn.Sequential(*modules)


def _ema_student(feature_extractor: nn.Module, encoder: nn.Module, scope: str) -> nn.Module:
    """The part of the student the teacher averages (a fresh container for ``"all"``; it
    shares the student's parameters and is never registered, so nothing is saved twice)."""
    if scope == "encoder":
        return encoder
    return nn.ModuleDict({"feature_extractor": feature_extractor, "encoder": encoder})


def make_teacher(feature_extractor: nn.Module, encoder: nn.Module, scope: str, copy_keys: Sequence[str] | None) -> EMATeacher:
    """An fp32 :class:`EMATeacher` of the encoder (``scope="encoder"``) or of feature extractor
    and encoder (``scope="all"``)."""
    if scope not in EMA_SCOPES:
        raise SpecError(f"ema_scope must be one of {', '.join(EMA_SCOPES)}, got {scope!r}.")
    keys = (copy_keys,) if isinstance(copy_keys, str) else tuple(copy_keys or ())
    return EMATeacher(_ema_student(feature_extractor, encoder, scope), copy_keys=keys)


def check_collapse(
    step: int,
    target_std: float,
    pred_std: float,
    *,
    after: int,
    min_target_std: float,
    min_pred_std: float,
    objective: str = "data2vec",
) -> None:
    """Raise :class:`TrainingCollapse` when, past update ``after``, the targets or predictions
    have (nearly) constant channels -- the failure mode of self-distillation."""
    if step <= after:
        return  # before ``after`` the statistics stay on the device (no host sync)
    target_std, pred_std = float(target_std), float(pred_std)
    problems = []
    if target_std < min_target_std:
        problems.append(f"target std {target_std:.4g} < min_target_std {min_target_std} (the teacher's targets lost their variance)")
    if pred_std < min_pred_std:
        problems.append(f"prediction std {pred_std:.4g} < min_pred_std {min_pred_std} (the student predicts a constant)")
    if not problems:
        return
    raise TrainingCollapse(
        f"{objective} pretraining collapsed at step {step}: {'; '.join(problems)}. "
        "Things to try: a lower optim.lr (for data2vec 2.0 audio, 7.5e-4 -> 5e-4 helped, fairseq #4177) or a "
        "longer warmup; check the data (silent, constant or duplicated inputs); a longer EMA anneal "
        "(model.objective.ema_anneal_end_step) or a lower ema_decay start. The guard is "
        "model.objective.collapse_check_after / min_target_std / min_pred_std."
    )


@torch.no_grad()
def run_teacher(
    teacher: EMATeacher,
    scope: str,
    batch: dict[str, Any],
    features: Tensor,
    padding_mask: Tensor | None,
    target_feature: str,
) -> EncoderOutput:
    """The teacher on the unmasked input, in eval mode without gradients: on the student's
    features (``scope="encoder"``) or on the raw input (``scope="all"``; ``batch["teacher_inputs"]``
    when the student's inputs were corrupted, e.g. BERT-masked text)."""
    if scope == "encoder":
        return teacher(features.detach(), padding_mask, output_layer_targets=True, target_feature=target_feature)
    model = teacher.model
    fe = model["feature_extractor"](batch.get("teacher_inputs", batch["inputs"]), batch.get("padding_mask"))
    return model["encoder"](fe.features, fe.padding_mask, output_layer_targets=True, target_feature=target_feature)


def _check_common(target_feature: str, ema_decay: float, ema_end_decay: float, ema_anneal_end_step: int) -> None:
    if target_feature not in TARGET_FEATURES:
        raise SpecError(f"target_feature must be one of {', '.join(TARGET_FEATURES)}, got {target_feature!r}.")
    for name, value in (("ema_decay", ema_decay), ("ema_end_decay", ema_end_decay)):
        if not 0.0 <= value <= 1.0:
            raise SpecError(f"{name} must be in [0, 1], got {value}.")
    if ema_anneal_end_step < 0:
        raise SpecError(f"ema_anneal_end_step must be >= 0, got {ema_anneal_end_step}.")


def normalize_loss(target: Target, loss: Tensor, sample_size: int) -> Tensor:
    """Per-token loss for ``reduction="sum"`` targets (fairseq's ``loss / sample_size``)."""
    if getattr(target, "reduction", "mean") == "sum":
        return loss / max(sample_size, 1)
    return loss


# --------------------------------------------------------------------------- shared objective base


class EMASelfDistillation(nn.Module):
    """What data2vec 1.0 and 2.0 share, kept in one place so the two cannot drift apart: the
    EMA teacher's decay schedule and runner hook, the per-token loss, the logs and the collapse
    guard. A subclass builds its student, then the teacher (:func:`make_teacher`)."""

    objective_name = "data2vec"  # names the objective in collapse messages

    feature_extractor: FeatureExtractor
    encoder: Encoder
    target: Target
    teacher: EMATeacher

    def __init__(
        self,
        *,
        ema_scope: str,
        ema_decay: float,
        ema_end_decay: float,
        ema_anneal_end_step: int,
        target_feature: str,
        collapse_check_after: int,
        min_target_std: float,
        min_pred_std: float,
    ):
        super().__init__()
        _check_common(target_feature, ema_decay, ema_end_decay, ema_anneal_end_step)
        self.ema_scope = ema_scope
        self.ema_decay = float(ema_decay)
        self.ema_end_decay = float(ema_end_decay)
        self.ema_anneal_end_step = int(ema_anneal_end_step)
        self.target_feature = target_feature
        self.collapse_check_after = int(collapse_check_after)
        self.min_target_std = float(min_target_std)
        self.min_pred_std = float(min_pred_std)
        # optimizer updates done so far (saved, so a resumed run checks collapse at once)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._update_offset: int | None = None

    # ------------------------------------------------------------------ EMA (runner hooks)
    def current_decay(self) -> float:
        return annealed_decay(int(self.num_updates), self.ema_decay, self.ema_end_decay, self.ema_anneal_end_step)

    def after_optimizer_step(self, step: int) -> None:
        """EMA update with the decay annealed to the number of updates done: ``step`` plus the
        updates the weights had before this run's first step (e.g. a fairseq checkpoint's, set
        by the importer), so continued pretraining keeps fairseq's decay schedule."""
        if self._update_offset is None:
            self._update_offset = max(0, int(self.num_updates) - (int(step) - 1))
        self.num_updates.fill_(self._update_offset + int(step))
        self.teacher.update(_ema_student(self.feature_extractor, self.encoder, self.ema_scope), self.current_decay())

    # ------------------------------------------------------------------ forward plumbing
    def _teacher_output(self, batch: dict[str, Any], features: Tensor, padding_mask: Tensor | None) -> EncoderOutput:
        """:func:`run_teacher` with this objective's scope and target feature."""
        return run_teacher(self.teacher, self.ema_scope, batch, features, padding_mask, self.target_feature)

    def _regression_loss(self, prediction: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float], int]:
        """Per-token loss (:func:`normalize_loss`), the target's stats and the number of regressed positions."""
        loss_sum, stats = self.target.loss(prediction, targets)
        sample_size = int(prediction.shape[0])
        return normalize_loss(self.target, loss_sum, sample_size), stats, sample_size

    def _pretrain_output(
        self, loss: Tensor, stats: dict[str, float], sample_size: int, positions: int, extra_logs: dict[str, float] | None = None
    ) -> PretrainOutput:
        """The output with the common logs first (``masked_frac`` over ``positions``), after the
        collapse guard, which only training runs (evaluation must report, never raise)."""
        logs = {
            "loss": loss.detach(),
            "target_std": stats.get("target_std", float("nan")),
            "pred_std": stats.get("pred_std", float("nan")),
            "ema_decay": self.current_decay(),
            "masked_frac": sample_size / max(positions, 1),
            **(extra_logs or {}),
        }
        for key, value in stats.items():  # a target's own statistics (e.g. a classifier's accuracy)
            logs.setdefault(key, value)
        if self.training:
            check_collapse(
                int(self.num_updates), logs["target_std"], logs["pred_std"],
                after=self.collapse_check_after, min_target_std=self.min_target_std,
                min_pred_std=self.min_pred_std, objective=self.objective_name,
            )
        return PretrainOutput(loss=loss, sample_size=sample_size, logs=logs)


# --------------------------------------------------------------------------- data2vec 1.0


class SelfDistillation(EMASelfDistillation):
    """The data2vec 1.0 objective (registered as objective ``data2vec``).

    Parameters (defaults: the data2vec 1.0 audio Base recipe):

    * ``feature_extractor``, ``encoder``: the student (built by the spec builder).
    * ``target``: the regression target (e.g. ``{name: data2vec, top_k: 8, layer_norm: instance}``).
    * ``masking``: the mask generator over the feature-rate ``(B, T)`` grid
      (e.g. ``{name: span, mask_prob: 0.65, mask_length: 10}``); called in ``forward`` unless
      the batch already carries ``mask`` or ``corrupted_mask``. Leave it out when the data
      pipeline masks (text: ``data.processor.masking: {name: bert, ...}``).
    * ``head_layers``: 1 = Linear(D->D) (audio, vision); 2 = text's two-layer head.
    * ``ema_scope``: ``"encoder"`` (speech) or ``"all"`` (vision 1.0, text).
    * ``copy_keys``: teacher parameters copied from the student instead of averaged (patterns
      of :func:`d2v.ssl.ema.matches_any`); default the audio positional conv.
    * ``ema_decay``, ``ema_end_decay``, ``ema_anneal_end_step``: the teacher's decay schedule.
    * ``target_feature``: ``"ffn"`` (FFN output before the last residual; speech, text) or
      ``"end"`` (block output; vision 1.0).
    * ``collapse_check_after``, ``min_target_std``, ``min_pred_std``: the collapse guard.
    """

    def __init__(
        self,
        *,
        feature_extractor: FeatureExtractor,
        encoder: Encoder,
        target: Target,
        masking: Any = None,
        head_layers: int = 1,
        ema_scope: str = "encoder",
        copy_keys: list[str] | tuple[str, ...] | None = ("pos_conv",),
        ema_decay: float = 0.999,
        ema_end_decay: float = 0.9999,
        ema_anneal_end_step: int = 30000,
        target_feature: str = "ffn",
        collapse_check_after: int = 5000,
        min_target_std: float = 0.1,
        min_pred_std: float = 0.01,
    ):
        super().__init__(
            ema_scope=ema_scope, ema_decay=ema_decay, ema_end_decay=ema_end_decay,
            ema_anneal_end_step=ema_anneal_end_step, target_feature=target_feature,
            collapse_check_after=collapse_check_after, min_target_std=min_target_std, min_pred_std=min_pred_std,
        )
        self.feature_extractor = feature_extractor
        self.encoder = encoder
        self.regression_head = regression_head(encoder.dim, head_layers)
        self.target = target
        self.masking = masking
        self.teacher = make_teacher(feature_extractor, encoder, ema_scope, copy_keys)

    # ------------------------------------------------------------------ masking
    def make_batch_transform(self) -> Any:
        """Masks drawn in the data-loader workers, seeded by the batch's example ids (as data2vec
        2.0's are): a batch gets the same mask whichever process, worker or position in the run
        it lands at, so a run on N processes equals one process accumulating the same batches, and
        a resumed run draws the masks it would have drawn. ``None`` when the processor masks
        (text) or there is no masking component."""
        if self.masking is None:
            return None
        return Data2Vec2Masks(self.masking, 1, frame_lengths_fn(self.feature_extractor),
                              getattr(self.feature_extractor, "grid_size", None))

    def _precomputed_mask(self, masks: Tensor, batch_size: int, length: int) -> Tensor:
        """``(B, T)`` from the loader's ``(B, 1, T - extra)`` masks, leading extra tokens kept."""
        extra = int(getattr(self.feature_extractor, "num_extra_tokens", 0) or 0)
        if tuple(masks.shape) != (batch_size, 1, length - extra):
            raise SpecError(
                f"data2vec: the batch's precomputed_mask has shape {tuple(masks.shape)} but the features need "
                f"({batch_size}, 1, {length - extra}); the feature extractor's frame_lengths_fn() does not match "
                "the lengths its forward produces."
            )
        mask = masks[:, 0].bool()
        if extra:
            mask = torch.cat([mask.new_zeros(batch_size, extra), mask], dim=1)
        return mask

    def compute_mask(self, batch_size: int, length: int, padding_mask: Tensor | None, device: torch.device) -> Tensor:
        """``(B, T)`` mask from the masking component; leading extra tokens (e.g. CLS) and
        padding are never masked."""
        if self.masking is None:
            raise SpecError(
                "data2vec: the batch carries no mask and model.objective has no masking; set model.objective.masking "
                "(e.g. {name: span, ...}) or let the processor mask the inputs (text: data.processor.masking: {name: bert})."
            )
        extra = int(getattr(self.feature_extractor, "num_extra_tokens", 0) or 0)
        grid = getattr(self.feature_extractor, "grid_size", None)
        pad = None if padding_mask is None else padding_mask[:, extra:]
        mask = sample_masks(self.masking, batch_size, length - extra, pad, rng=mask_seed(), grid=grid)
        if extra:
            mask = torch.cat([mask.new_zeros(batch_size, extra), mask], dim=1)
        return mask.to(device)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any]) -> PretrainOutput:
        fe = self.feature_extractor(batch["inputs"], batch.get("padding_mask"))
        features, padding_mask = fe.features, fe.padding_mask
        B, T = features.shape[:2]
        # the data pipeline may have corrupted the inputs already (BERT-masked text tokens):
        # then the student regresses those positions and the encoder does not mask again
        corrupted = batch.get("corrupted_mask")
        mask = corrupted if corrupted is not None else batch.get("mask")
        if mask is None and batch.get("precomputed_mask") is not None:
            mask = self._precomputed_mask(batch["precomputed_mask"], B, T).to(features.device)
        if mask is None:
            mask = self.compute_mask(B, T, padding_mask, features.device)
        mask = mask.bool()
        if mask.shape != (B, T):
            raise ValueError(f"data2vec: mask has shape {tuple(mask.shape)}, the features are {B}x{T}.")

        # the teacher reads the student's features before masking (features are not modified
        # in place below, so no explicit clone is needed)
        teacher_out = self._teacher_output(batch, features, padding_mask)
        with torch.no_grad():
            targets = self.target(teacher_out, mask)

        student = self.encoder(features, padding_mask, None if corrupted is not None else mask)
        prediction = self.regression_head(student.last_hidden_state[mask])
        loss, stats, sample_size = self._regression_loss(prediction, targets)
        valid = T * B if padding_mask is None else int((~padding_mask).sum())
        return self._pretrain_output(loss, stats, sample_size, valid)
