"""data2vec 2.0: the same self-distillation, made cheap (Baevski et al. 2022, arXiv 2212.07525).

::

    inputs --feature_extractor--> features ------------(unmasked, once per sample)--> teacher --> target (B, T, D)
                                     |                                                              | repeat_interleave(M)
                                     | repeat_interleave(M), zero masked frames                     v
                                     +--> encoder.embed --> keep unmasked --> encoder.contextualize --> scatter back
                                          (B*M, T, D)        (B*M, K, D)                               + noise at masked
                                                                                                        --> decoder --> L2 at masked

What makes it fast (REFERENCE.md §2.1):

1. the student's Transformer runs on the **kept tokens only** (``K = T - masked``): masked
   frames are zeroed before the encoder's positional scheme (audio ``encoder_zero_mask``),
   then dropped; ``position_ids`` tell position-aware encoders where each kept token was;
2. **M masks per sample** (``clone_batch``): the feature extractor and the teacher run once per
   sample, the student sees M differently masked copies, targets are ``repeat_interleave``-d;
3. masks are **precomputed in the data-loader workers** by :meth:`Data2Vec2.make_batch_transform`
   (``batch["precomputed_mask"]``, ``(B, M, T)``); a batch without them is masked in ``forward``;
4. a light **conv decoder** (``Decoder1d``/``Decoder2d`` from the target's plugin) predicts
   every position from the kept outputs put back in place with N(0, ``mask_noise_std``) noise
   at the masked positions; the loss reads masked positions only;
5. optional **CLS loss** (images): the student's extra-token output regresses the time-mean of
   the targets, weighted ``cls_loss`` (per masked token, as fairseq's ``cls_loss * sample_size``).

The teacher (fp32 EMA, eval mode, no grad) averages the encoder (audio: positional conv +
layers; the student's conv feature extractor output is reused, ``ema_scope="encoder"``) or
feature extractor + encoder (images, ``ema_scope="all"``); text copies its embeddings
(``copy_keys``). Same outputs, EMA hook and collapse guard as :mod:`d2v.ssl.distill` (the shared
base :class:`d2v.ssl.distill.EMASelfDistillation`), so either objective is one line of a spec.

Hooks for other modalities (not needed by audio): a feature extractor may expose
``num_extra_tokens`` (leading tokens such as CLS, always kept, never masked), ``grid_size``
(``(H, W)`` of the patch grid: 2-D masks and ``Decoder2d``) and ``frame_lengths_fn()`` (a
picklable callable mapping input lengths to feature lengths, used in the loader workers;
conv stacks with ``conv_kernel``/``conv_stride`` get one automatically).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from d2v.ssl.batch_masks import Data2Vec2Masks, frame_lengths_fn, mask_seed, sample_masks
from d2v.ssl.distill import EMASelfDistillation, PretrainOutput, make_teacher
from d2v.api.errors import SpecError
from d2v.api.interfaces import Encoder, EncoderOutput, FeatureExtractor, Target
from d2v.ssl.masking import keep_indices

__all__ = ["Data2Vec2", "decoder_input"]


def decoder_input(kept: Tensor, ids_restore: Tensor, noise_std: float) -> Tensor:
    """Put the kept outputs ``(N, K, D)`` back in place: ``(N, T, D)`` with N(0, ``noise_std``)
    vectors at the ``T - K`` masked positions (``ids_restore`` from :func:`keep_indices`)."""
    n, k, d = kept.shape
    t = ids_restore.shape[1]
    noise = kept.new_empty(n, t - k, d).normal_(0.0, noise_std)
    merged = torch.cat([kept, noise], dim=1)
    return merged.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, d))


# --------------------------------------------------------------------------- the objective


class Data2Vec2(EMASelfDistillation):
    """The data2vec 2.0 objective (registered as objective ``data2vec2``).

    Parameters (defaults: data2vec 2.0 audio Base, fairseq ``config/v2/base_audio_only_task``):

    * ``feature_extractor``, ``encoder``, ``target``, ``masking``: as for ``data2vec``; the
      masking component must give every row the same masked count (audio:
      ``{name: inverse_block, dims: 1, inverse: false, mask_prob: 0.5, mask_length: 5,
      mask_prob_adjust: 0.05}``; images: ``inverse_block`` dims 2; text: ``random``).
    * ``clone_batch``: M masked copies per example (audio 8, images 16, text 8).
    * ``decoder_type``: ``"1d"`` (audio, text) or ``"2d"`` (images; needs the feature
      extractor's ``grid_size``); ``decoder_dim``, ``decoder_kernel``, ``decoder_layers``,
      ``decoder_groups``, ``decoder_residual``, ``decoder_projection_layers``: its shape
      (audio base 384/7/4/16, residual, 1 projection); ``decoder_input_dropout``: dropout on
      the kept outputs before the decoder (0.1).
    * ``mask_noise_std``: std of the noise vectors at masked positions (0.01).
    * ``encoder_zero_mask``: zero masked frames before the encoder's positional scheme (audio).
    * ``cls_loss``: weight of the CLS loss (images 0.01; needs ``num_extra_tokens`` >= 1).
    * ``ema_scope``, ``copy_keys``, ``ema_decay``, ``ema_end_decay``, ``ema_anneal_end_step``,
      ``target_feature``, ``collapse_check_after``, ``min_target_std``, ``min_pred_std``:
      as for ``data2vec`` (audio base: 0.999 -> 0.99999 over 75k, nothing copied).
    """

    objective_name = "data2vec2"

    def __init__(
        self,
        *,
        feature_extractor: FeatureExtractor,
        encoder: Encoder,
        target: Target,
        masking: Any,
        clone_batch: int = 8,
        decoder_type: str = "1d",
        decoder_dim: int = 384,
        decoder_kernel: int = 7,
        decoder_layers: int = 4,
        decoder_groups: int = 16,
        decoder_residual: bool = True,
        decoder_projection_layers: int = 1,
        decoder_input_dropout: float = 0.1,
        mask_noise_std: float = 0.01,
        encoder_zero_mask: bool = True,
        cls_loss: float = 0.0,
        ema_scope: str = "encoder",
        copy_keys: list[str] | tuple[str, ...] | None = None,
        ema_decay: float = 0.999,
        ema_end_decay: float = 0.99999,
        ema_anneal_end_step: int = 75000,
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
        if clone_batch < 1:
            raise SpecError(f"data2vec2: clone_batch must be >= 1, got {clone_batch}.")
        self.num_extra_tokens = int(getattr(feature_extractor, "num_extra_tokens", 0) or 0)
        grid = getattr(feature_extractor, "grid_size", None)
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        if cls_loss > 0 and self.num_extra_tokens < 1:
            raise SpecError("data2vec2: cls_loss > 0 needs a feature extractor with a CLS token (num_extra_tokens >= 1).")
        if cls_loss > 0 and not hasattr(target, "build"):
            raise SpecError(f"data2vec2: cls_loss needs a target with full-sequence targets (build()); {type(target).__name__} has none.")
        make_decoder = getattr(target, "make_decoder", None)
        if make_decoder is None:
            raise SpecError(
                f"data2vec2: target '{type(target).__name__}' provides no data2vec 2.0 decoder (make_decoder); "
                "use target {name: data2vec, ...}."
            )

        self.feature_extractor = feature_extractor
        self.encoder = encoder
        self.decoder = make_decoder(
            decoder_type, encoder.dim, grid=self.grid, dim=decoder_dim, kernel=decoder_kernel, layers=decoder_layers,
            groups=decoder_groups, residual=decoder_residual, projection_layers=decoder_projection_layers,
        )
        self.target = target
        self.masking = masking
        self.teacher = make_teacher(feature_extractor, encoder, ema_scope, copy_keys)
        self.clone_batch = int(clone_batch)
        self.decoder_input_dropout = float(decoder_input_dropout)
        self.mask_noise_std = float(mask_noise_std)
        self.encoder_zero_mask = bool(encoder_zero_mask)
        self.cls_loss = float(cls_loss)

    # ------------------------------------------------------------------ runner hooks
    def make_batch_transform(self) -> Data2Vec2Masks:
        """The picklable transform that precomputes the M masks per example in the workers."""
        return Data2Vec2Masks(self.masking, self.clone_batch, frame_lengths_fn(self.feature_extractor), self.grid)

    # ------------------------------------------------------------------ pieces
    def _masks(self, batch: dict[str, Any], batch_size: int, length: int, padding_mask: Tensor | None,
               device: torch.device) -> Tensor:
        """``(B*M, T)`` masks: the precomputed ones, or drawn now."""
        masks = batch.get("precomputed_mask")
        expected = (batch_size, self.clone_batch, length)
        if masks is not None and tuple(masks.shape) != expected:  # training on other masks would hide the bug
            raise SpecError(
                f"data2vec2: the batch's precomputed_mask has shape {tuple(masks.shape)} but the features need "
                f"{expected} (batch, clone_batch, frames); the feature extractor's frame_lengths_fn() does not "
                "match the lengths its forward produces."
            )
        if masks is None:
            rows_pad = None if padding_mask is None else padding_mask.repeat_interleave(self.clone_batch, 0)
            masks = sample_masks(self.masking, batch_size * self.clone_batch, length, rows_pad,
                                 rng=mask_seed(), grid=self.grid)
        return masks.reshape(batch_size * self.clone_batch, length).to(device=device, dtype=torch.bool)

    @torch.no_grad()
    def _targets(self, teacher_out: EncoderOutput, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """Targets at the masked positions of all clones ``(N, D)``, and the per-example
        full targets ``(B, T, D)`` when the target can build them (data2vec's can)."""
        build = getattr(self.target, "build", None)
        M, E = self.clone_batch, self.num_extra_tokens
        if build is not None:
            full = build(teacher_out, skip_tokens=E)
            clone, position = mask.nonzero(as_tuple=True)  # row-major, as full.repeat_interleave(M, 0)[mask]
            return full[clone // M, position], full  # without M copies of the targets
        # a generic Target: repeat the teacher's per-layer features for the clones
        layers = tuple(t[:, E:].repeat_interleave(M, 0) for t in teacher_out.layer_targets)
        pad = teacher_out.padding_mask
        repeated = EncoderOutput(
            last_hidden_state=layers[-1], layer_targets=layers,
            padding_mask=None if pad is None else pad[:, E:].repeat_interleave(M, 0),
        )
        return self.target(repeated, mask), None

    def encode_kept(self, features: Tensor, padding_mask: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The student on the kept tokens of each clone.

        ``features`` ``(B*M, E+T, D)`` (E leading extra tokens), ``mask`` ``(B*M, T)``. Returns
        the encoder output ``(B*M, E+K, D)`` of the kept tokens, ``ids_keep`` ``(B*M, E+K)``
        (their positions) and ``ids_restore`` ``(B*M, T)`` over the masked grid.
        """
        E = self.num_extra_tokens
        rows, _, dim = features.shape
        full_mask = F.pad(mask, (E, 0), value=False)
        x = features
        if self.encoder_zero_mask:
            x = x.masked_fill(full_mask.unsqueeze(-1), 0.0)
        # an explicit all-False mask: no mask embedding and no SpecAugment in embed()
        x = self.encoder.embed(x, padding_mask, torch.zeros_like(full_mask))
        ids_keep_grid, ids_restore = keep_indices(mask)
        ids_keep = ids_keep_grid + E
        if E:
            extra = torch.arange(E, device=ids_keep.device).expand(rows, E)
            ids_keep = torch.cat([extra, ids_keep], dim=1)
        kept = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        kept_pad = None
        if padding_mask is not None:
            kept_pad = padding_mask.gather(1, ids_keep)
            if not bool(kept_pad.any()):
                kept_pad = None
        out = self.encoder.contextualize(kept, kept_pad, position_ids=ids_keep)
        return out.last_hidden_state, ids_keep, ids_restore

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any]) -> PretrainOutput:
        if batch.get("corrupted_mask") is not None:
            raise SpecError("data2vec2 masks by dropping tokens, but the processor already corrupted the inputs "
                            "(corrupted_mask); remove data.processor.masking from the spec.")
        M, E = self.clone_batch, self.num_extra_tokens
        fe = self.feature_extractor(batch["inputs"], batch.get("padding_mask"))
        features, padding_mask = fe.features, fe.padding_mask
        B, total, _ = features.shape
        T = total - E
        grid_pad = None if padding_mask is None else padding_mask[:, E:]
        mask = self._masks(batch, B, T, grid_pad, features.device)

        # teacher: once per example, on the unmasked input
        teacher_out = self._teacher_output(batch, features, padding_mask)
        targets, full_targets = self._targets(teacher_out, mask)

        # student: M clones, kept tokens only
        rows_pad = None if padding_mask is None else padding_mask.repeat_interleave(M, 0)
        hidden, _, ids_restore = self.encode_kept(features.repeat_interleave(M, 0), rows_pad, mask)
        kept = F.dropout(hidden[:, E:], self.decoder_input_dropout, self.training)
        x = decoder_input(kept, ids_restore, self.mask_noise_std)
        if grid_pad is not None:
            x = x.masked_fill(grid_pad.repeat_interleave(M, 0).unsqueeze(-1), 0.0)
        prediction = self.decoder(x)[mask]

        loss, stats, sample_size = self._regression_loss(prediction, targets)

        logs: dict[str, float] = {}
        if self.cls_loss > 0:
            valid = torch.ones(B, T, 1, device=features.device) if grid_pad is None else (~grid_pad).unsqueeze(-1).float()
            cls_target = (full_targets * valid).sum(1) / valid.sum(1).clamp(min=1.0)
            cls_value, _ = self.target.loss(hidden[:, E - 1], cls_target.repeat_interleave(M, 0))
            loss = loss + self.cls_loss * cls_value
            logs["cls_loss"] = cls_value.detach()

        n_valid = B * T if grid_pad is None else int((~grid_pad).sum())
        return self._pretrain_output(loss, stats, sample_size, n_valid * M, logs)
