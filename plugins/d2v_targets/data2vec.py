"""The data2vec regression target (1.0 and 2.0): the teacher's top-K layer average.

Recipe (data2vec paper §3.3, fairseq ``examples/data2vec``):

1. take the per-layer target feature of the teacher's top ``top_k`` layers
   (``EncoderOutput.layer_targets``: the FFN output before the last residual, or the block's
   output for vision 1.0 -- chosen by the encoder's ``target_feature``);
2. normalise each layer without parameters: ``"instance"`` (over time, per channel, per
   utterance; speech) or ``"layer"`` (over channels, per token; text and vision);
3. average the K normalised layers;
4. optionally normalise the average again (``final_norm``; vision 1.0 uses ``"layer"``);
5. keep only the masked positions.

The loss compares the student's predictions with those targets: L2 or smooth-L1(β), each
token's loss summed over channels and multiplied by ``loss_scale`` (``None`` = 1/sqrt(D)), then
summed over tokens (``reduction="sum"``: speech, text, data2vec 2.0; the objective divides by the
number of masked tokens as fairseq's trainer does) or averaged over every element
(``reduction="mean"``: vision 1.0, as BEiT's ``F.smooth_l1_loss``).

Unlike fairseq (whose pretraining crops each batch to equal lengths), instance norm here only
uses the real frames of each utterance: padded frames contribute nothing to the statistics and
come out as zeros.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from d2v.api.errors import SpecError
from d2v import EncoderOutput, Target

NORMS = ("instance", "layer", None)
LOSSES = ("l2", "smooth_l1")
REDUCTIONS = ("sum", "mean")


def instance_norm(x: Tensor, padding_mask: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalise ``x`` ``(B, T, D)`` over time, per example and channel (``F.instance_norm``
    semantics: biased variance, no affine), using only the positions where ``padding_mask``
    ``(B, T)`` is False. Padded positions are returned as 0."""
    x = x.float()
    if padding_mask is None or not bool(padding_mask.any()):
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + eps)
    valid = (~padding_mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (x * valid).sum(dim=1, keepdim=True) / count
    centered = (x - mean) * valid
    var = (centered * centered).sum(dim=1, keepdim=True) / count
    return centered / torch.sqrt(var + eps)


def layer_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Parameter-less LayerNorm over the channel dimension."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def normalize(x: Tensor, kind: str | None, padding_mask: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    if kind is None:
        return x.float()
    if kind == "instance":
        return instance_norm(x, padding_mask, eps)
    if kind == "layer":
        return layer_norm(x, eps)
    raise SpecError(f"unknown normalisation {kind!r}; choose one of 'instance', 'layer' or null.")


def channel_std(y: Tensor, *, sync: bool = True) -> Tensor:
    """data2vec's collapse statistic (fairseq ``compute_var``): the standard deviation of each
    channel over all rows of ``y`` ``(N, D)``, averaged over channels. Summed over processes
    when ``torch.distributed`` runs with more than one process and ``sync`` is set.

    A 0-d tensor on ``y``'s device: reading it is a host sync, which the runner does once per
    logging window rather than in every step."""
    y = y.detach().float().reshape(-1, y.shape[-1])
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        stats = torch.cat([y.new_tensor([float(y.shape[0])]), y.sum(dim=0), (y * y).sum(dim=0)])
        dist.all_reduce(stats)
        n, s, ss = stats[0], stats[1 : 1 + y.shape[1]], stats[1 + y.shape[1] :]
        var = ss / (n - 1) - s * s / (n * (n - 1))
    else:
        if y.shape[0] < 2:
            return y.new_tensor(float("nan"))
        var = y.var(dim=0)
    return torch.sqrt(var.clamp(min=0) + 1e-6).mean()


class Data2VecTarget(Target):
    """data2vec's top-K average target and its regression loss.

    Parameters (data2vec 1.0 audio defaults; see ``docs/pretraining.md`` for each modality):

    * ``top_k``: how many of the teacher's top layers to average (audio 8, text 10, vision 6).
    * ``layer_norm``: per-layer normalisation, ``"instance"`` (speech, data2vec 2.0),
      ``"layer"`` (text, vision 1.0) or ``None``.
    * ``final_norm``: normalisation of the average, ``None``, ``"layer"`` (vision) or
      ``"instance"``.
    * ``loss``: ``"l2"`` or ``"smooth_l1"`` (with ``beta``; text uses 4, vision 2).
    * ``loss_scale``: factor on each token's loss; ``None`` means ``1/sqrt(D)``.
    * ``reduction``: ``"sum"`` (per-token loss summed over channels, times the scale, summed
      over tokens) or ``"mean"`` (mean over all elements, times the scale).
    * ``eps``: epsilon of the normalisations.
    * ``sync_stats``: all-reduce target/prediction std across processes in training, as
      fairseq does (never in evaluation, whose batches are split unevenly across processes).
    """

    def __init__(
        self,
        *,
        top_k: int = 8,
        layer_norm: str | None = "instance",
        final_norm: str | None = None,
        loss: str = "l2",
        beta: float = 1.0,
        loss_scale: float | None = None,
        reduction: str = "sum",
        eps: float = 1e-5,
        sync_stats: bool = True,
    ):
        super().__init__()
        if top_k < 1:
            raise SpecError(f"data2vec target: top_k must be >= 1, got {top_k}.")
        for key, value in (("layer_norm", layer_norm), ("final_norm", final_norm)):
            if value not in NORMS:
                raise SpecError(f"data2vec target: {key} must be 'instance', 'layer' or null, got {value!r}.")
        if loss not in LOSSES:
            raise SpecError(f"data2vec target: loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
        if loss == "smooth_l1" and beta <= 0:
            raise SpecError(f"data2vec target: smooth_l1 needs beta > 0, got {beta} (use loss: l2 for beta 0).")
        if reduction not in REDUCTIONS:
            raise SpecError(f"data2vec target: reduction must be 'sum' or 'mean', got {reduction!r}.")
        self.top_k = int(top_k)
        self.layer_norm = layer_norm
        self.final_norm = final_norm
        self.loss_type = loss
        self.beta = float(beta)
        self.loss_scale = loss_scale
        self.reduction = reduction
        self.eps = float(eps)
        self.sync_stats = sync_stats

    def extra_repr(self) -> str:
        return (
            f"top_k={self.top_k}, layer_norm={self.layer_norm}, final_norm={self.final_norm}, "
            f"loss={self.loss_type}, beta={self.beta}, loss_scale={self.loss_scale}, reduction={self.reduction}"
        )

    # ---------------------------------------------------------------- targets
    @torch.no_grad()
    def build(self, teacher_output: EncoderOutput, skip_tokens: int = 0) -> Tensor:
        """Full-sequence targets ``(B, T, D)`` in fp32, before masked selection.

        ``skip_tokens`` leading positions (e.g. a CLS token) are dropped first, as fairseq does
        for the extra tokens of data2vec 2.0 images.
        """
        layers = teacher_output.layer_targets
        if not layers:
            raise SpecError(
                "data2vec target: the teacher's EncoderOutput has no layer_targets; run the "
                "teacher encoder with output_layer_targets=True."
            )
        if self.top_k > len(layers):
            raise SpecError(
                f"data2vec target: top_k={self.top_k} but the teacher encoder has only {len(layers)} layers."
            )
        padding_mask = teacher_output.padding_mask
        if padding_mask is not None and skip_tokens:
            padding_mask = padding_mask[:, skip_tokens:]
        total = None
        for layer in layers[-self.top_k :]:
            normed = normalize(layer[:, skip_tokens:], self.layer_norm, padding_mask, self.eps)
            total = normed if total is None else total + normed
        y = total / self.top_k
        if self.final_norm is not None:
            y = normalize(y, self.final_norm, padding_mask, self.eps)
        return y

    def forward(self, teacher_output: EncoderOutput, mask: Tensor) -> Tensor:
        """Targets ``(N, D)`` at the ``N`` positions where ``mask`` ``(B, T)`` is True."""
        return self.build(teacher_output)[mask.bool()]

    # ---------------------------------------------------------------- data2vec 2.0
    def make_decoder(self, kind: str, input_dim: int, *, grid: tuple[int, int] | None = None, **options):
        """The data2vec 2.0 decoder that predicts these targets (core's ``Data2Vec2`` asks
        the target for it, so core never imports this plugin): see :mod:`d2v_targets.decoders`."""
        from d2v_targets.decoders import make_decoder

        return make_decoder(kind, input_dim, grid=grid, **options)

    # ---------------------------------------------------------------- loss
    def scale_for(self, dim: int) -> float:
        return 1.0 / math.sqrt(dim) if self.loss_scale is None else float(self.loss_scale)

    def elementwise(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Unreduced loss ``(N, D)`` in fp32 (no scale)."""
        prediction = prediction.float()
        target = target.float()
        if self.loss_type == "l2":
            return F.mse_loss(prediction, target, reduction="none")
        return F.smooth_l1_loss(prediction, target, reduction="none", beta=self.beta)

    def loss(self, prediction: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, stats)`` for ``prediction`` vs ``target`` ``(N, D)``.

        ``reduction="sum"``: ``sum_n scale * sum_d l(n, d)``; ``reduction="mean"``:
        ``scale * mean_{n,d} l(n, d)``. Stats: ``target_std`` and ``pred_std``
        (:func:`channel_std`).
        """
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        per_element = self.elementwise(prediction, target)
        scale = self.scale_for(prediction.shape[-1])
        if self.reduction == "sum":
            value = per_element.sum() * scale
        else:
            value = per_element.mean() * scale
        # all-reduce only in training, where every process runs the same number of steps; an
        # evaluation split is sharded unevenly and a collective there could hang
        sync = self.sync_stats and self.training
        stats = {
            "target_std": channel_std(target, sync=sync),
            "pred_std": channel_std(prediction, sync=sync),
        }
        return value, stats
