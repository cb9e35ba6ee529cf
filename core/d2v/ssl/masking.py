"""Mask generators for data2vec 1.0 and 2.0: pure, seeded, cheap enough for data-loader workers.

Every function takes an explicit ``rng`` (a :class:`numpy.random.Generator`, or an int seed)
and returns numpy bool arrays with ``True`` = masked, so the same seed gives the same mask in
any process. ``padding_mask`` arguments use d2v's convention: bool, ``True`` = padding; padded
positions are never masked.

The thin component classes at the bottom (``SpanMask``, ``BlockMask2d``, ``BertMask``,
``InverseBlockMask``, ``RandomMask``) are what experiment specs name (registered by
``d2v.api.builtins`` under kind ``masking``); their ``__call__`` returns torch tensors.

Counting conventions (all ``floor``; a ``1e-6`` slack absorbs float error such as
``10 * (1 - 0.9) = 0.999...``):

* ``compute_block_mask_1d/2d`` without ``inverse_mask``: exactly ``floor(L * mask_prob)``
  masked per row.
* ``compute_block_mask_1d/2d`` with ``inverse_mask`` and ``random_mask``: exactly
  ``floor(L * (1 - mask_prob))`` **kept** per row, i.e. ``L - floor(L * (1 - mask_prob))``
  masked -- fairseq data2vec 2.0's convention (``len_keep = int(L * (1 - mask_ratio))``), so
  a 14x14 image at ``mask_prob=0.8`` keeps 39 patches and masks 157, as released models did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from d2v.api.errors import SpecError

__all__ = [
    "compute_span_mask",
    "span_starts",
    "compute_block_mask_2d_beit",
    "bert_token_mask",
    "compute_block_mask_1d",
    "compute_block_mask_2d",
    "random_mask",
    "keep_indices",
    "SpanMask",
    "BlockMask2d",
    "BertMask",
    "InverseBlockMask",
    "RandomMask",
]

_EPS = 1e-6


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------


def _rng(rng: Any, *, required: bool) -> np.random.Generator:
    """A Generator from ``rng`` (Generator or int seed); ``None`` is allowed only if not required."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        if required:
            raise TypeError("rng is required: pass a numpy.random.Generator (e.g. np.random.default_rng(seed)) or an int seed.")
        return np.random.default_rng()
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}.")


def _check_prob(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SpecError(f"{name} must be a number in [0, 1], got {value!r}.")
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise SpecError(f"{name} must be in [0, 1], got {value}.")
    return value


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise SpecError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def _check_shape(shape: Any, ndim: int | tuple[int, ...], what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise SpecError(f"{what}: shape must be a tuple of ints, got {shape!r}.") from None
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if len(shape) not in allowed:
        raise SpecError(f"{what}: shape must have {' or '.join(map(str, allowed))} dimensions, got {shape}.")
    if any(s < 0 for s in shape):
        raise SpecError(f"{what}: shape must be non-negative, got {shape}.")
    return shape


def _as_bool_array(x: Any, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    """``x`` (torch / numpy / None) as a numpy bool array of ``shape``; ``None`` stays ``None``."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x).astype(bool, copy=False)
    if x.shape != shape:
        raise SpecError(f"{name} has shape {x.shape}, expected {shape}.")
    return x


def _floor_count(length: int | np.ndarray, frac: float) -> int | np.ndarray:
    """``floor(length * frac)``, tolerant of float error just below an integer."""
    return np.floor(np.asarray(length) * frac + _EPS).astype(np.int64)


def _resize_rows(sel: np.ndarray, allowed: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> None:
    """In place: make row ``i`` of ``sel`` have exactly ``target[i]`` True entries inside ``allowed``.

    Extra entries are dropped and missing ones added uniformly at random (fairseq's trim/fill).
    """
    counts = sel.sum(axis=1)
    for i in np.flatnonzero(counts != target):
        if counts[i] > target[i]:
            on = np.flatnonzero(sel[i])
            sel[i, rng.choice(on, counts[i] - target[i], replace=False)] = False
        else:
            off = np.flatnonzero(allowed[i] & ~sel[i])
            sel[i, rng.choice(off, target[i] - counts[i], replace=False)] = True


def _to_torch(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))


# ----------------------------------------------------------------------------------------
# wav2vec 2.0 / data2vec 1.0 span masking
# ----------------------------------------------------------------------------------------


def span_starts(
    valid_len: int,
    mask_prob: float,
    mask_length: int,
    *,
    rng: np.random.Generator,
    min_masks: int = 0,
    no_overlap: bool = False,
) -> np.ndarray:
    """Start offsets of the spans for one sequence of ``valid_len`` usable positions.

    ``n = max(min_masks, int(mask_prob * valid_len / mask_length + U))`` with ``U ~ [0, 1)``
    (probabilistic rounding, so ``E[n] = mask_prob * valid_len / mask_length`` exactly when
    ``min_masks`` does not bind). Starts are distinct and uniform over
    ``[0, valid_len - mask_length]`` so every span fits; ``n`` is capped at the number of
    possible starts. With ``no_overlap`` the arrangement is uniform over non-overlapping
    placements (``n`` capped at ``valid_len // mask_length``). A sequence shorter than
    ``mask_length`` gets no span (as Hugging Face's ``_compute_mask_indices`` does).
    """
    rng = _rng(rng, required=True)
    n = max(int(min_masks), int(mask_prob * valid_len / mask_length + rng.random()))
    if valid_len < mask_length or n == 0:
        return np.zeros(0, dtype=np.int64)
    if no_overlap:
        n = min(n, valid_len // mask_length)
        free = valid_len - n * mask_length
        # stars and bars: collapse each span to one slot, choose slots, re-expand
        slots = np.sort(rng.choice(free + n, n, replace=False))
        return (slots + np.arange(n) * (mask_length - 1)).astype(np.int64)
    n_pos = valid_len - mask_length + 1
    return rng.choice(n_pos, min(n, n_pos), replace=False).astype(np.int64)


def compute_span_mask(
    shape: Sequence[int],
    mask_prob: float,
    mask_length: int,
    *,
    rng: np.random.Generator,
    padding_mask: Any = None,
    min_masks: int = 0,
    require_same_masks: bool = True,
    no_overlap: bool = False,
) -> np.ndarray:
    """wav2vec 2.0 / data2vec 1.0 span masking (fairseq ``compute_mask_indices``, static lengths).

    Per row, :func:`span_starts` picks the spans over the row's non-padded positions (for a
    right-padded batch: over ``[0, valid_len)``, as fairseq does); spans may overlap unless
    ``no_overlap``. With ``require_same_masks`` every row is then thinned, at random, to the
    smallest masked count in the batch (fairseq does the same, so the student sees the same
    number of masked frames per example). Returns ``(B, T)`` bool, True = masked.
    """
    B, T = _check_shape(shape, 2, "compute_span_mask")
    mask_prob = _check_prob("mask_prob", mask_prob)
    mask_length = _check_int("mask_length", mask_length, 1)
    min_masks = _check_int("min_masks", min_masks, 0)
    rng = _rng(rng, required=True)
    pad = _as_bool_array(padding_mask, (B, T), "padding_mask")

    mask = np.zeros((B, T), dtype=bool)
    offsets = np.arange(mask_length)
    for i in range(B):
        valid = None if pad is None else np.flatnonzero(~pad[i])
        n_valid = T if valid is None else valid.size
        starts = span_starts(n_valid, mask_prob, mask_length, rng=rng, min_masks=min_masks, no_overlap=no_overlap)
        if starts.size == 0:
            continue
        pos = (starts[:, None] + offsets).ravel()
        mask[i, pos if valid is None else valid[pos]] = True

    if require_same_masks and B > 1:
        counts = mask.sum(axis=1)
        _resize_rows(mask, mask, np.full(B, counts.min()), rng)
    return mask


# ----------------------------------------------------------------------------------------
# BEiT block-wise masking (data2vec 1.0 vision)
# ----------------------------------------------------------------------------------------


def _beit_block(
    mask: np.ndarray,
    max_patches: int,
    *,
    rng: np.random.Generator,
    min_num_patches: int,
    log_aspect: tuple[float, float],
    attempts: int = 10,
) -> tuple[int, tuple[int, int, int, int] | None]:
    """Try (up to ``attempts`` times) to mask one rectangle in ``mask`` (in place).

    A try draws an area uniform between ``min_num_patches`` and ``max_patches`` and a
    log-uniform aspect ratio; the rectangle must be strictly smaller than the grid in both
    directions (as BEiT) and must add between 1 and ``max_patches`` new cells. Returns
    ``(cells added, (top, left, h, w))`` or ``(0, None)`` when every try failed.
    """
    H, W = mask.shape
    lo, hi = sorted((float(min_num_patches), float(max_patches)))
    for _ in range(attempts):
        area = rng.uniform(lo, hi)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (h < H and w < W):
            continue
        top = int(rng.integers(0, H - h + 1))
        left = int(rng.integers(0, W - w + 1))
        window = mask[top : top + h, left : left + w]
        new = h * w - int(window.sum())
        if 0 < new <= max_patches:
            window[...] = True
            return new, (top, left, h, w)
    return 0, None


def compute_block_mask_2d_beit(
    height: int,
    width: int,
    num_masking_patches: int,
    *,
    rng: np.random.Generator,
    min_num_patches: int = 4,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> np.ndarray:
    """BEiT's ``MaskingGenerator`` (data2vec 1.0 vision): rectangles until the budget is met.

    Rectangles of area ``U[min_num_patches, max_num_patches]`` (capped by the remaining
    budget) and aspect ratio log-uniform in ``[min_aspect, max_aspect or 1/min_aspect]`` are
    added until ``num_masking_patches`` cells are masked; a rectangle is only accepted if it
    does not overshoot, so the count never exceeds the budget. Stops early when 10 tries in a
    row fail to add a rectangle. Returns ``(height, width)`` bool.
    """
    H = _check_int("height", height, 1)
    W = _check_int("width", width, 1)
    num = _check_int("num_masking_patches", num_masking_patches, 0)
    if num > H * W:
        raise SpecError(f"num_masking_patches={num} is more than the {H}x{W}={H * W} patches of the grid.")
    min_num = _check_int("min_num_patches", min_num_patches, 1)
    max_num = num if max_num_patches is None else _check_int("max_num_patches", max_num_patches, 1)
    if not (isinstance(min_aspect, (int, float)) and min_aspect > 0):
        raise SpecError(f"min_aspect must be > 0, got {min_aspect!r}.")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    if not (isinstance(max_aspect, (int, float)) and max_aspect >= min_aspect):
        raise SpecError(f"max_aspect must be >= min_aspect ({min_aspect}), got {max_aspect!r}.")
    rng = _rng(rng, required=True)
    log_aspect = (math.log(min_aspect), math.log(max_aspect))

    mask = np.zeros((H, W), dtype=bool)
    count = 0
    while count < num:
        budget = min(num - count, max_num)
        added, _ = _beit_block(mask, budget, rng=rng, min_num_patches=min_num, log_aspect=log_aspect)
        if added == 0:
            break
        count += added
    return mask


# ----------------------------------------------------------------------------------------
# BERT token masking (data2vec 1.0 text)
# ----------------------------------------------------------------------------------------


def bert_token_mask(
    tokens: Any,
    *,
    rng: np.random.Generator,
    mask_token_id: int,
    vocab_size: int,
    special_tokens_mask: Any = None,
    mask_prob: float = 0.15,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
    mask_length: int = 1,
    special_ids: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking: select tokens, then 80% ``<mask>`` / 10% random token / 10% unchanged.

    ``tokens`` is ``(B, T)`` or ``(T,)`` ints; ``special_tokens_mask`` (same shape, True =
    special or padding) marks positions that are never selected.

    * ``mask_length == 1`` (paper): each row selects exactly ``round(mask_prob * n_valid)``
      of its ``n_valid`` non-special tokens (round half up), at least one when
      ``n_valid > 0`` and ``mask_prob > 0``, uniformly without replacement.
    * ``mask_length > 1`` (released data2vec text config: ``mask_prob=0.35``, spans of 4,
      ``replace_prob=1``): spans via :func:`compute_span_mask` over the non-special
      positions, ``min_masks=1``, rows not equalised.

    Each selected token independently becomes ``mask_token_id`` with ``replace_prob``, a
    random id with ``random_prob``, else stays. Random ids are uniform over
    ``[0, vocab_size)`` minus ``mask_token_id``, ``special_ids`` and every id found at a
    special position of this batch (so pad/bos/eos are never drawn). Returns
    ``(new_tokens, selected)``; ``selected`` marks all selected positions (including the
    unchanged ones) -- data2vec's fairseq code scores only positions that became
    ``<mask>`` (``new_tokens == mask_token_id``), see fairseq issue #4229.
    """
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise SpecError(f"tokens must be integer ids, got dtype {arr.dtype}.")
    orig_shape = arr.shape
    squeeze = arr.ndim == 1
    if squeeze:
        arr = arr[None]
    if arr.ndim != 2:
        raise SpecError(f"tokens must be (B, T) or (T,), got shape {arr.shape}.")
    B, T = arr.shape
    mask_prob = _check_prob("mask_prob", mask_prob)
    replace_prob = _check_prob("replace_prob", replace_prob)
    random_prob = _check_prob("random_prob", random_prob)
    if replace_prob + random_prob > 1.0 + 1e-9:
        raise SpecError(f"replace_prob + random_prob must be <= 1, got {replace_prob} + {random_prob}.")
    mask_length = _check_int("mask_length", mask_length, 1)
    vocab_size = _check_int("vocab_size", vocab_size, 1)
    mask_token_id = _check_int("mask_token_id", mask_token_id, 0)
    if mask_token_id >= vocab_size:
        raise SpecError(f"mask_token_id={mask_token_id} is outside the vocabulary [0, {vocab_size}).")
    rng = _rng(rng, required=True)
    special = _as_bool_array(special_tokens_mask, orig_shape, "special_tokens_mask")
    special = np.zeros((B, T), dtype=bool) if special is None else special.reshape(B, T)

    if mask_length == 1:
        n_valid = (~special).sum(axis=1)
        n_sel = np.floor(mask_prob * n_valid + 0.5).astype(np.int64)
        if mask_prob > 0:
            n_sel = np.where(n_valid > 0, np.maximum(n_sel, 1), 0)
        noise = rng.random((B, T))
        noise[special] = np.inf  # special positions sort last, never among the first n_sel
        order = np.argsort(noise, axis=1, kind="stable")
        selected = np.zeros((B, T), dtype=bool)
        np.put_along_axis(selected, order, np.arange(T)[None, :] < n_sel[:, None], axis=1)
    else:
        selected = compute_span_mask(
            (B, T),
            mask_prob,
            mask_length,
            rng=rng,
            padding_mask=special,
            min_masks=1 if mask_prob > 0 else 0,
            require_same_masks=False,
        )

    u = rng.random((B, T))
    to_mask = selected & (u < replace_prob)
    to_random = selected & (u >= replace_prob) & (u < replace_prob + random_prob)

    new = arr.copy()
    new[to_mask] = mask_token_id
    n_random = int(to_random.sum())
    if n_random:
        excluded = np.unique(np.concatenate([[mask_token_id], np.asarray(special_ids, dtype=np.int64), arr[special]]))
        allowed = np.setdiff1d(np.arange(vocab_size), excluded, assume_unique=True)
        if allowed.size == 0:
            raise SpecError("no token id is left to draw random replacements from (all ids are special).")
        new[to_random] = allowed[rng.integers(0, allowed.size, size=n_random)]
    if squeeze:
        return new[0], selected[0]
    return new, selected


# ----------------------------------------------------------------------------------------
# data2vec 2.0 block masking and MAE random masking
# ----------------------------------------------------------------------------------------


def _block_positions(centres: np.ndarray, dims: tuple[int, ...], mask_length: int) -> np.ndarray:
    """Flat indices covered by blocks of side ``mask_length`` around flat ``centres``.

    The block around centre ``c`` spans ``[c - mask_length // 2, c - mask_length // 2 +
    mask_length)`` in every dimension, clipped to the grid (fairseq clamps indices, which
    amounts to the same set). Returns ``(n_centres, mask_length ** len(dims))`` indices.
    """
    offsets = np.arange(mask_length) - mask_length // 2
    if len(dims) == 1:
        (T,) = dims
        return np.clip(centres[:, None] + offsets, 0, T - 1)
    H, W = dims
    r, c = np.divmod(centres, W)
    rows = np.clip(r[:, None] + offsets, 0, H - 1)
    cols = np.clip(c[:, None] + offsets, 0, W - 1)
    return (rows[:, :, None] * W + cols[:, None, :]).reshape(len(centres), -1)


def _block_mask(
    B: int,
    dims: tuple[int, ...],
    mask_prob: float,
    mask_length: int,
    rng: np.random.Generator,
    mask_prob_adjust: float,
    inverse_mask: bool,
    require_same_masks: bool,
    pad: np.ndarray | None,
) -> np.ndarray:
    """Shared body of the 1d / 2d block masks; works on flat ``(B, L)`` and returns it."""
    L = int(np.prod(dims))
    valid = np.ones((B, L), dtype=bool) if pad is None else ~pad.reshape(B, L)
    n_valid = valid.sum(axis=1)
    p = 1.0 - mask_prob if inverse_mask else mask_prob  # probability of *selecting* a position
    area = mask_length ** len(dims)

    sel = np.zeros((B, L), dtype=bool)
    for i in range(B):
        if n_valid[i] == 0:
            continue
        n_centres = int(n_valid[i] * (p + mask_prob_adjust) / area)
        if n_centres <= 0:
            continue
        where = np.flatnonzero(valid[i])
        centres = where[rng.integers(0, where.size, size=n_centres)]  # with replacement, as fairseq
        sel[i, _block_positions(centres, dims, mask_length).ravel()] = True
    sel &= valid

    if require_same_masks:
        # equal *masked* count in every row; without padding this is floor(L * mask_prob)
        # masked, or floor(L * (1 - mask_prob)) kept with inverse_mask (fairseq).
        if inverse_mask:
            masked = n_valid - _floor_count(n_valid, 1.0 - mask_prob)
        else:
            masked = _floor_count(n_valid, mask_prob)
        m = int(masked.min()) if B else 0
        target = n_valid - m if inverse_mask else np.full(B, m)
        _resize_rows(sel, valid, target, rng)

    return (valid & ~sel) if inverse_mask else sel


def _block_args(mask_prob: float, mask_length: int, mask_prob_adjust: float) -> tuple[float, int, float]:
    mask_prob = _check_prob("mask_prob", mask_prob)
    mask_length = _check_int("mask_length", mask_length, 1)
    if isinstance(mask_prob_adjust, bool) or not isinstance(mask_prob_adjust, (int, float)) or mask_prob_adjust < 0:
        raise SpecError(f"mask_prob_adjust must be a number >= 0, got {mask_prob_adjust!r}.")
    return mask_prob, mask_length, float(mask_prob_adjust)


def compute_block_mask_1d(
    shape: Sequence[int],
    mask_prob: float,
    mask_length: int,
    *,
    rng: np.random.Generator,
    mask_prob_adjust: float = 0.0,
    inverse_mask: bool = False,
    padding_mask: Any = None,
    require_same_masks: bool = True,
) -> np.ndarray:
    """data2vec 2.0 1-D block masking (audio; fairseq ``compute_block_mask_1d``).

    ``int(L * (p + mask_prob_adjust) / mask_length)`` centres are drawn uniformly (with
    replacement) and blocks of ``mask_length`` around them are selected, where ``p`` is
    ``mask_prob`` or, with ``inverse_mask``, ``1 - mask_prob`` (the blocks are what is kept).
    ``require_same_masks`` then trims/fills at random to the exact count (see the module
    docstring). ``mask_prob_adjust`` compensates for block overlap so little filling is
    needed. With ``padding_mask``, ``L`` is each row's valid length, padding is never
    masked and every row gets the smallest row's masked count. Returns ``(B, T)`` bool.
    """
    B, T = _check_shape(shape, 2, "compute_block_mask_1d")
    mask_prob, mask_length, mask_prob_adjust = _block_args(mask_prob, mask_length, mask_prob_adjust)
    rng = _rng(rng, required=True)
    pad = _as_bool_array(padding_mask, (B, T), "padding_mask")
    return _block_mask(B, (T,), mask_prob, mask_length, rng, mask_prob_adjust, inverse_mask, require_same_masks, pad)


def compute_block_mask_2d(
    shape: Sequence[int],
    mask_prob: float,
    mask_length: int,
    *,
    rng: np.random.Generator,
    mask_prob_adjust: float = 0.0,
    inverse_mask: bool = False,
    require_same_masks: bool = True,
    padding_mask: Any = None,
) -> np.ndarray:
    """data2vec 2.0 2-D block masking (images; fairseq ``compute_block_mask_2d``).

    Like :func:`compute_block_mask_1d` on an ``H x W`` patch grid with ``mask_length x
    mask_length`` squares and ``int(L * (p + mask_prob_adjust) / mask_length**2)`` centres
    (``L = H * W``). The vision recipe is ``mask_prob=0.8, mask_length=3,
    mask_prob_adjust=0.07, inverse_mask=True``: 3x3 blocks choose the ~20% of patches the
    student keeps. ``shape`` is ``(B, H, W)``, or fairseq's ``(B, L)`` with ``L`` a perfect
    square; the result has the same shape.
    """
    shape = _check_shape(shape, (2, 3), "compute_block_mask_2d")
    if len(shape) == 2:
        B, L = shape
        d = math.isqrt(L)
        if d * d != L:
            raise SpecError(f"compute_block_mask_2d: shape (B, L)={shape} needs L to be a perfect square; pass (B, H, W).")
        H = W = d
    else:
        B, H, W = shape
    mask_prob, mask_length, mask_prob_adjust = _block_args(mask_prob, mask_length, mask_prob_adjust)
    rng = _rng(rng, required=True)
    pad = _as_bool_array(padding_mask, shape, "padding_mask")
    flat = _block_mask(B, (H, W), mask_prob, mask_length, rng, mask_prob_adjust, inverse_mask, require_same_masks, pad)
    return flat.reshape(shape)


def random_mask(shape: Sequence[int], mask_prob: float, *, rng: np.random.Generator, padding_mask: Any = None) -> np.ndarray:
    """MAE random masking (data2vec 2.0 text, ``mask_length == 1``).

    Each row keeps exactly ``floor(T * (1 - mask_prob))`` positions chosen uniformly and masks
    the rest -- fairseq ``random_masking``'s ``len_keep`` convention (``T=512,
    mask_prob=0.48`` masks 246). With ``padding_mask``, only valid positions are masked and
    every row masks the smallest row's count. Returns ``(B, T)`` bool.
    """
    B, T = _check_shape(shape, 2, "random_mask")
    mask_prob = _check_prob("mask_prob", mask_prob)
    rng = _rng(rng, required=True)
    pad = _as_bool_array(padding_mask, (B, T), "padding_mask")
    n_valid = np.full(B, T) if pad is None else (~pad).sum(axis=1)
    n_mask = int((n_valid - _floor_count(n_valid, 1.0 - mask_prob)).min()) if B else 0
    noise = rng.random((B, T))
    if pad is not None:
        noise[pad] = -1.0  # padding sorts first, never among the largest n_mask
    order = np.argsort(noise, axis=1, kind="stable")
    mask = np.zeros((B, T), dtype=bool)
    np.put_along_axis(mask, order, np.arange(T)[None, :] >= T - n_mask, axis=1)
    return mask


def keep_indices(mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_keep, ids_restore)`` for data2vec 2.0's "encode only the unmasked tokens".

    ``ids_keep`` ``(B, K)``: the unmasked positions of each row in ascending order.
    ``ids_restore`` ``(B, T)``: gathering ``cat([x_kept, x_masked], 1)`` (masked positions in
    ascending order too) with it restores the original order. Every row must keep the same
    number of positions ``K`` (use ``require_same_masks``).
    """
    if not isinstance(mask, torch.Tensor):
        mask = torch.from_numpy(np.asarray(mask))
    if mask.dim() != 2:
        raise ValueError(f"keep_indices expects a (B, T) mask, got shape {tuple(mask.shape)}.")
    mask = mask.bool()
    kept = (~mask).sum(dim=1)
    if kept.numel() and not bool((kept == kept[0]).all()):
        raise ValueError(
            "keep_indices needs the same number of unmasked positions in every row, got "
            f"{kept.tolist()}; build the mask with require_same_masks=True (or an exact-count generator)."
        )
    K = int(kept[0]) if kept.numel() else 0
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # kept (0) first, each group ascending
    ids_restore = torch.argsort(order, dim=1)
    return order[:, :K].contiguous(), ids_restore


# ----------------------------------------------------------------------------------------
# components (what specs name); __call__ returns torch tensors
# ----------------------------------------------------------------------------------------


class SpanMask:
    """wav2vec 2.0 / data2vec 1.0 span masking (audio); see :func:`compute_span_mask`.

    Defaults are data2vec 1.0 audio's: ``mask_prob=0.65``, spans of 10 frames, at least one
    span, same masked count in every row (about half of the frames end up masked).
    """

    def __init__(
        self,
        *,
        mask_prob: float = 0.65,
        mask_length: int = 10,
        min_masks: int = 1,
        require_same_masks: bool = True,
        no_overlap: bool = False,
    ):
        self.mask_prob = _check_prob("mask_prob", mask_prob)
        self.mask_length = _check_int("mask_length", mask_length, 1)
        self.min_masks = _check_int("min_masks", min_masks, 0)
        self.require_same_masks = bool(require_same_masks)
        self.no_overlap = bool(no_overlap)

    def __call__(self, shape: Sequence[int], padding_mask: Any = None, rng: Any = None) -> torch.Tensor:
        return _to_torch(
            compute_span_mask(
                shape,
                self.mask_prob,
                self.mask_length,
                rng=_rng(rng, required=False),
                padding_mask=padding_mask,
                min_masks=self.min_masks,
                require_same_masks=self.require_same_masks,
                no_overlap=self.no_overlap,
            )
        )

    def __repr__(self) -> str:
        return f"SpanMask(mask_prob={self.mask_prob}, mask_length={self.mask_length}, min_masks={self.min_masks})"


class BlockMask2d:
    """BEiT block-wise image masking (data2vec 1.0 vision); see :func:`compute_block_mask_2d_beit`.

    Each image of the batch gets its own mask; masked cells that fall on padding (if a
    ``padding_mask`` is given) are cleared, so such rows may mask fewer patches.
    """

    def __init__(
        self,
        *,
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        self.num_masking_patches = _check_int("num_masking_patches", num_masking_patches, 0)
        self.min_num_patches = _check_int("min_num_patches", min_num_patches, 1)
        self.max_num_patches = None if max_num_patches is None else _check_int("max_num_patches", max_num_patches, 1)
        if not (isinstance(min_aspect, (int, float)) and min_aspect > 0):
            raise SpecError(f"min_aspect must be > 0, got {min_aspect!r}.")
        if max_aspect is not None and not (isinstance(max_aspect, (int, float)) and max_aspect >= min_aspect):
            raise SpecError(f"max_aspect must be >= min_aspect ({min_aspect}), got {max_aspect!r}.")
        self.min_aspect = float(min_aspect)
        self.max_aspect = None if max_aspect is None else float(max_aspect)

    def __call__(self, shape: Sequence[int], padding_mask: Any = None, rng: Any = None) -> torch.Tensor:
        B, H, W = _check_shape(shape, 3, "BlockMask2d")
        rng = _rng(rng, required=False)
        pad = _as_bool_array(padding_mask, (B, H, W), "padding_mask")
        out = np.zeros((B, H, W), dtype=bool)
        for i in range(B):
            out[i] = compute_block_mask_2d_beit(
                H,
                W,
                self.num_masking_patches,
                rng=rng,
                min_num_patches=self.min_num_patches,
                max_num_patches=self.max_num_patches,
                min_aspect=self.min_aspect,
                max_aspect=self.max_aspect,
            )
        if pad is not None:
            out &= ~pad
        return _to_torch(out)

    def __repr__(self) -> str:
        return f"BlockMask2d(num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches})"


class BertMask:
    """BERT token masking (data2vec 1.0 text); see :func:`bert_token_mask`.

    ``mask_length > 1`` gives the released data2vec text config's span variant
    (``mask_prob=0.35, mask_length=4, replace_prob=1.0, random_prob=0.0``).
    """

    def __init__(
        self,
        *,
        mask_prob: float = 0.15,
        replace_prob: float = 0.8,
        random_prob: float = 0.1,
        mask_length: int = 1,
    ):
        self.mask_prob = _check_prob("mask_prob", mask_prob)
        self.replace_prob = _check_prob("replace_prob", replace_prob)
        self.random_prob = _check_prob("random_prob", random_prob)
        if self.replace_prob + self.random_prob > 1.0 + 1e-9:
            raise SpecError(f"replace_prob + random_prob must be <= 1, got {replace_prob} + {random_prob}.")
        self.mask_length = _check_int("mask_length", mask_length, 1)

    def __call__(
        self,
        tokens: torch.Tensor,
        *,
        mask_token_id: int,
        vocab_size: int,
        special_tokens_mask: Any = None,
        rng: Any = None,
        special_ids: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = tokens.device if isinstance(tokens, torch.Tensor) else torch.device("cpu")
        new, selected = bert_token_mask(
            tokens,
            rng=_rng(rng, required=False),
            mask_token_id=mask_token_id,
            vocab_size=vocab_size,
            special_tokens_mask=special_tokens_mask,
            mask_prob=self.mask_prob,
            replace_prob=self.replace_prob,
            random_prob=self.random_prob,
            mask_length=self.mask_length,
            special_ids=special_ids,
        )
        return torch.from_numpy(new).to(device=device, dtype=torch.long), _to_torch(selected).to(device)

    def __repr__(self) -> str:
        return (
            f"BertMask(mask_prob={self.mask_prob}, replace_prob={self.replace_prob}, "
            f"random_prob={self.random_prob}, mask_length={self.mask_length})"
        )


class InverseBlockMask:
    """data2vec 2.0 block masking with an exact count; see :func:`compute_block_mask_2d`.

    Defaults are the image base recipe (``mask_prob=0.8``, 3x3 blocks, ``adjust=0.07``,
    inverse: blocks pick what is kept). ``dims=1`` with ``inverse=False``,
    ``mask_prob=0.5, mask_length=5, mask_prob_adjust=0.05`` is the audio recipe.
    ``shape`` is ``(B, T)`` for ``dims=1`` and ``(B, H, W)`` (or square ``(B, L)``) for ``dims=2``.
    """

    def __init__(
        self,
        *,
        mask_prob: float = 0.8,
        mask_length: int = 3,
        mask_prob_adjust: float = 0.07,
        inverse: bool = True,
        dims: int = 2,
        require_same_masks: bool = True,
    ):
        self.mask_prob, self.mask_length, self.mask_prob_adjust = _block_args(mask_prob, mask_length, mask_prob_adjust)
        if dims not in (1, 2):
            raise SpecError(f"dims must be 1 or 2, got {dims!r}.")
        self.dims = dims
        self.inverse = bool(inverse)
        self.require_same_masks = bool(require_same_masks)

    def __call__(self, shape: Sequence[int], padding_mask: Any = None, rng: Any = None) -> torch.Tensor:
        fn = compute_block_mask_1d if self.dims == 1 else compute_block_mask_2d
        return _to_torch(
            fn(
                shape,
                self.mask_prob,
                self.mask_length,
                rng=_rng(rng, required=False),
                mask_prob_adjust=self.mask_prob_adjust,
                inverse_mask=self.inverse,
                padding_mask=padding_mask,
                require_same_masks=self.require_same_masks,
            )
        )

    def __repr__(self) -> str:
        return (
            f"InverseBlockMask(mask_prob={self.mask_prob}, mask_length={self.mask_length}, "
            f"mask_prob_adjust={self.mask_prob_adjust}, inverse={self.inverse}, dims={self.dims})"
        )


class RandomMask:
    """MAE random masking with an exact count per row (data2vec 2.0 text); see :func:`random_mask`."""

    def __init__(self, *, mask_prob: float = 0.48):
        self.mask_prob = _check_prob("mask_prob", mask_prob)

    def __call__(self, shape: Sequence[int], padding_mask: Any = None, rng: Any = None) -> torch.Tensor:
        return _to_torch(random_mask(shape, self.mask_prob, rng=_rng(rng, required=False), padding_mask=padding_mask))

    def __repr__(self) -> str:
        return f"RandomMask(mask_prob={self.mask_prob})"
