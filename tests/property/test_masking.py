"""Property tests for d2v.ssl.masking: shapes, determinism, padding, counts and statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2v.ssl import masking as M
from d2v.api.errors import SpecError

FAST = settings(deadline=None, max_examples=40)
seeds = st.integers(0, 2**32 - 1)
probs = st.floats(0.0, 1.0, allow_nan=False)


def rng(seed):
    return np.random.default_rng(seed)


@st.composite
def padded_batch(draw, max_b=6, max_t=120, min_t=1):
    """(B, T, padding_mask) with either right padding or scattered padding."""
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(min_t, max_t))
    kind = draw(st.sampled_from(["none", "right", "scattered"]))
    if kind == "none":
        return B, T, None
    if kind == "right":
        lens = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
        pad = np.arange(T)[None, :] >= np.asarray(lens)[:, None]
    else:
        s = draw(seeds)
        pad = np.random.default_rng(s).random((B, T)) < draw(st.floats(0.0, 0.6))
    return B, T, pad


def runs(row):
    """(start, length) of the maximal runs of True in a 1-D bool array."""
    padded = np.concatenate([[False], row, [False]]).astype(np.int8)
    d = np.diff(padded)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return list(zip(starts, ends - starts))


# ----------------------------------------------------------------------------------------
# span masking (wav2vec 2.0 / data2vec 1.0)
# ----------------------------------------------------------------------------------------


@FAST
@given(padded_batch(), probs, st.integers(1, 12), st.integers(0, 3), st.booleans(), st.booleans(), seeds)
def test_span_mask_shape_determinism_padding(batch, p, length, min_masks, same, no_overlap, seed):
    B, T, pad = batch
    kw = dict(padding_mask=pad, min_masks=min_masks, require_same_masks=same, no_overlap=no_overlap)
    a = M.compute_span_mask((B, T), p, length, rng=rng(seed), **kw)
    b = M.compute_span_mask((B, T), p, length, rng=rng(seed), **kw)
    assert a.shape == (B, T) and a.dtype == bool
    np.testing.assert_array_equal(a, b)
    valid = np.full(B, T) if pad is None else (~pad).sum(1)
    if pad is not None:
        assert not (a & pad).any()
    counts = a.sum(1)
    if same:
        assert len(set(counts.tolist())) == 1
    # never more than (max possible spans) * length, nothing for rows shorter than a span
    max_spans = np.maximum(min_masks, np.floor(p * valid / length) + 1)
    assert (counts <= np.minimum(max_spans * length, valid)).all()
    assert (counts[valid < length] == 0).all()


@FAST
@given(padded_batch(max_b=5), probs, st.integers(1, 8), seeds)
def test_span_mask_same_masks_is_a_thinning(batch, p, length, seed):
    """require_same_masks keeps a random subset of each row's spans, down to the smallest count."""
    B, T, pad = batch
    free = M.compute_span_mask((B, T), p, length, rng=rng(seed), padding_mask=pad, require_same_masks=False)
    same = M.compute_span_mask((B, T), p, length, rng=rng(seed), padding_mask=pad, require_same_masks=True)
    assert not (same & ~free).any()
    np.testing.assert_array_equal(same.sum(1), np.full(B, free.sum(1).min()))


@FAST
@given(st.integers(0, 300), probs, st.integers(1, 15), st.integers(0, 4), st.booleans(), seeds)
def test_span_starts_fit_and_are_distinct(valid_len, p, length, min_masks, no_overlap, seed):
    starts = M.span_starts(valid_len, p, length, rng=rng(seed), min_masks=min_masks, no_overlap=no_overlap)
    if valid_len < length:
        assert starts.size == 0
        return
    assert len(set(starts.tolist())) == starts.size
    assert (starts >= 0).all() and (starts + length <= valid_len).all()
    wanted_lo = max(min_masks, math.floor(p * valid_len / length))
    cap = valid_len // length if no_overlap else valid_len - length + 1
    assert min(wanted_lo, cap) <= starts.size <= min(max(min_masks, math.floor(p * valid_len / length) + 1), cap)
    if no_overlap:
        s = np.sort(starts)
        assert (np.diff(s) >= length).all()


def test_span_count_expectation():
    """E[#spans] = mask_prob * T / mask_length exactly (probabilistic rounding)."""
    r = rng(0)
    n = np.array([M.span_starts(500, 0.65, 10, rng=r).size for _ in range(4000)])
    assert set(np.unique(n)) <= {32, 33}
    assert abs(n.mean() - 32.5) < 0.05


def _expected_span_fraction(T, p, length):
    """Exact E[masked fraction]: n distinct starts uniform over N = T - len + 1 positions."""
    N = T - length + 1
    x = p * T / length
    lo, frac = math.floor(x), x - math.floor(x)
    total = 0.0
    for n, w in ((lo, 1 - frac), (lo + 1, frac)):
        if w == 0:
            continue
        covered = 0.0
        for t in range(T):
            k = min(t, N - 1) - max(0, t - length + 1) + 1  # starts that cover position t
            covered += 1 - math.comb(N - k, n) / math.comb(N, n)
        total += w * covered / T
    return total


def test_span_masked_fraction_statistics():
    """data2vec audio's defaults mask ~49% of frames (paper: p=0.065 start prob -> ~49%)."""
    T, p, length = 500, 0.65, 10
    m = M.compute_span_mask((2000, T), p, length, rng=rng(1), require_same_masks=False)
    expected = _expected_span_fraction(T, p, length)
    assert 0.45 < expected < 0.53
    assert abs(m.mean() - expected) < 0.005
    # each row: masked <= spans * length
    assert (m.sum(1) <= 33 * length).all()


# ----------------------------------------------------------------------------------------
# BEiT block masking (data2vec 1.0 vision)
# ----------------------------------------------------------------------------------------


@FAST
@given(st.integers(1, 16), st.integers(1, 16), st.data(), st.integers(1, 20), st.floats(0.1, 1.0), seeds)
def test_beit_mask_budget_and_determinism(H, W, data, min_patches, min_aspect, seed):
    num = data.draw(st.integers(0, H * W))
    max_patches = data.draw(st.one_of(st.none(), st.integers(1, H * W)))
    kw = dict(min_num_patches=min_patches, max_num_patches=max_patches, min_aspect=min_aspect)
    a = M.compute_block_mask_2d_beit(H, W, num, rng=rng(seed), **kw)
    b = M.compute_block_mask_2d_beit(H, W, num, rng=rng(seed), **kw)
    assert a.shape == (H, W) and a.dtype == bool
    np.testing.assert_array_equal(a, b)
    assert a.sum() <= num


@FAST
@given(st.integers(2, 16), st.integers(2, 16), st.integers(1, 40), st.integers(1, 30), seeds)
def test_beit_block_is_a_rectangle(H, W, budget, min_patches, seed):
    r = rng(seed)
    mask = r.random((H, W)) < 0.3
    before = mask.copy()
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    added, rect = M._beit_block(mask, budget, rng=r, min_num_patches=min_patches, log_aspect=log_aspect)
    if rect is None:
        assert added == 0
        np.testing.assert_array_equal(mask, before)
        return
    top, left, h, w = rect
    assert 0 <= top and top + h <= H and 0 <= left and left + w <= W and h < H and w < W
    box = np.zeros_like(mask)
    box[top : top + h, left : left + w] = True
    new = mask & ~before
    assert not (new & ~box).any()  # new cells only inside the rectangle
    assert mask[box].all()  # and the whole rectangle is masked now
    assert 0 < added == new.sum() <= budget


@pytest.mark.parametrize("num", [75, 120])
def test_beit_reaches_close_to_budget(num):
    r = rng(2)
    counts = [M.compute_block_mask_2d_beit(14, 14, num, rng=r, min_num_patches=16, max_num_patches=196).sum() for _ in range(200)]
    assert max(counts) <= num
    assert np.mean(counts) >= 0.9 * num


@FAST
@given(st.integers(1, 4), st.integers(4, 14), st.integers(4, 14), seeds)
def test_block_mask_2d_component(B, H, W, seed):
    gen = M.BlockMask2d(num_masking_patches=(H * W) // 2, min_num_patches=4)
    pad = rng(seed).random((B, H, W)) < 0.2
    a = gen((B, H, W), padding_mask=torch.from_numpy(pad), rng=seed)
    b = gen((B, H, W), padding_mask=pad, rng=np.random.default_rng(seed))
    assert a.dtype == torch.bool and a.shape == (B, H, W)
    assert torch.equal(a, b)
    assert not (a.numpy() & pad).any()


# ----------------------------------------------------------------------------------------
# BERT masking (data2vec 1.0 text)
# ----------------------------------------------------------------------------------------


@st.composite
def token_batch(draw):
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 80))
    vocab = draw(st.integers(8, 500))
    s = np.random.default_rng(draw(seeds))
    tokens = s.integers(4, vocab - 1, size=(B, T))  # 0..3 special, vocab-1 = <mask>
    special = s.random((B, T)) < draw(st.floats(0.0, 0.5))
    tokens[special] = s.integers(0, 4, size=special.sum())
    return tokens, special, vocab


@FAST
@given(token_batch(), probs, st.integers(1, 5), seeds)
def test_bert_mask_properties(batch, p, length, seed):
    tokens, special, vocab = batch
    mask_id = vocab - 1
    kw = dict(
        mask_token_id=mask_id, vocab_size=vocab, special_tokens_mask=special, mask_prob=p, mask_length=length, special_ids=range(4)
    )
    new, sel = M.bert_token_mask(tokens, rng=rng(seed), **kw)
    new2, sel2 = M.bert_token_mask(tokens, rng=rng(seed), **kw)
    np.testing.assert_array_equal(new, new2)
    np.testing.assert_array_equal(sel, sel2)
    assert new.shape == tokens.shape and sel.shape == tokens.shape and sel.dtype == bool
    assert not (sel & special).any()
    np.testing.assert_array_equal(new[~sel], tokens[~sel])  # unselected tokens untouched
    changed = sel & (new != tokens) & (new != mask_id)
    assert ((new[changed] >= 4) & (new[changed] < vocab - 1)).all()  # random ids are never special / <mask>
    assert ((new >= 0) & (new < vocab)).all()
    n_valid = (~special).sum(1)
    if length == 1:
        expected = np.floor(p * n_valid + 0.5).astype(int)
        if p > 0:
            expected = np.where(n_valid > 0, np.maximum(expected, 1), 0)
        np.testing.assert_array_equal(sel.sum(1), expected)


def test_bert_mask_80_10_10_statistics():
    r = rng(3)
    B, T, vocab = 200, 512, 1000
    tokens = r.integers(4, vocab - 1, size=(B, T))
    special = np.zeros((B, T), bool)
    special[:, 0] = special[:, -1] = True
    tokens[:, 0], tokens[:, -1] = 0, 2
    new, sel = M.bert_token_mask(tokens, rng=r, mask_token_id=vocab - 1, vocab_size=vocab, special_tokens_mask=special)
    np.testing.assert_array_equal(sel.sum(1), np.full(B, 77))  # 0.15 * 510 = 76.5 -> 77 (half up)
    n = sel.sum()
    frac_mask = (new[sel] == vocab - 1).mean()
    frac_same = (new[sel] == tokens[sel]).mean()
    frac_random = 1 - frac_mask - frac_same
    assert abs(frac_mask - 0.8) < 0.01
    assert abs(frac_same - 0.1) < 0.01  # (a random draw hits the original id with prob ~1/1000)
    assert abs(frac_random - 0.1) < 0.01
    assert n == B * 77
    # ids seen at special positions (0 and 2 here) are never drawn as random replacements
    assert not np.isin(new[sel], [0, 2]).any()


def test_bert_span_variant_and_component():
    gen = M.BertMask(mask_prob=0.35, mask_length=4, replace_prob=1.0, random_prob=0.0)
    r = rng(4)
    tokens = torch.from_numpy(r.integers(4, 99, size=(64, 128)))
    special = torch.zeros(64, 128, dtype=torch.bool)
    special[:, 0] = True
    new, sel = gen(tokens, mask_token_id=99, vocab_size=100, special_tokens_mask=special, rng=5)
    assert new.dtype == torch.long and sel.dtype == torch.bool
    assert not sel[:, 0].any()
    assert torch.equal(new[sel], torch.full_like(new[sel], 99))  # replace_prob=1: every selected becomes <mask>
    assert torch.equal(new[~sel], tokens[~sel])
    # mask_prob of 0.35 with overlapping spans of 4 masks roughly 30% of the tokens
    assert 0.25 < sel.float().mean().item() < 0.36
    # runs have length >= 4 unless cut by the special position (spans never cross it here)
    for row in sel.numpy():
        assert all(n >= 4 for _, n in runs(row))


# ----------------------------------------------------------------------------------------
# data2vec 2.0 block masking
# ----------------------------------------------------------------------------------------


@FAST
@given(st.integers(1, 6), st.integers(1, 150), probs, st.integers(1, 8), st.floats(0, 0.2), st.booleans(), st.booleans(), seeds)
def test_block_mask_1d_exact_count(B, T, p, length, adjust, inverse, use_pad, seed):
    pad = None
    if use_pad:
        pad = np.arange(T)[None, :] >= rng(seed).integers(0, T + 1, size=(B, 1))
    kw = dict(mask_prob_adjust=adjust, inverse_mask=inverse, padding_mask=pad)
    a = M.compute_block_mask_1d((B, T), p, length, rng=rng(seed), **kw)
    b = M.compute_block_mask_1d((B, T), p, length, rng=rng(seed), **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (B, T) and a.dtype == bool
    valid = np.full(B, T) if pad is None else (~pad).sum(1)
    per_row = valid - np.floor(valid * (1 - p) + 1e-6) if inverse else np.floor(valid * p + 1e-6)
    np.testing.assert_array_equal(a.sum(1), np.full(B, per_row.min()))
    if pad is not None:
        assert not (a & pad).any()


@FAST
@given(st.integers(1, 6), st.integers(1, 16), st.integers(1, 16), probs, st.integers(1, 5), st.floats(0, 0.2), st.booleans(), seeds)
def test_block_mask_2d_exact_count(B, H, W, p, length, adjust, inverse, seed):
    kw = dict(mask_prob_adjust=adjust, inverse_mask=inverse)
    a = M.compute_block_mask_2d((B, H, W), p, length, rng=rng(seed), **kw)
    b = M.compute_block_mask_2d((B, H, W), p, length, rng=rng(seed), **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (B, H, W) and a.dtype == bool
    L = H * W
    expected = L - math.floor(L * (1 - p) + 1e-6) if inverse else math.floor(L * p + 1e-6)
    np.testing.assert_array_equal(a.reshape(B, -1).sum(1), np.full(B, expected))


def test_block_mask_2d_vision_recipe_counts():
    """ViT-B/16 at 224px: 196 patches, mask_prob 0.8 inverse -> keep 39, mask 157 (fairseq)."""
    gen = M.InverseBlockMask()  # defaults = image base recipe
    m = gen((16, 14, 14), rng=0)
    assert m.shape == (16, 14, 14) and m.dtype == torch.bool
    assert (m.flatten(1).sum(1) == 157).all()
    flat = M.compute_block_mask_2d((16, 196), 0.8, 3, rng=rng(0), mask_prob_adjust=0.07, inverse_mask=True)
    assert flat.shape == (16, 196)
    np.testing.assert_array_equal(flat.reshape(16, 14, 14), m.numpy())  # (B, L) square == (B, H, W)


@FAST
@given(st.integers(1, 60), st.integers(1, 9), st.data())
def test_block_positions_1d(T, length, data):
    c = data.draw(st.integers(0, T - 1))
    pos = M._block_positions(np.array([c]), (T,), length)[0]
    lo = c - length // 2
    np.testing.assert_array_equal(np.unique(pos), np.arange(max(lo, 0), min(lo + length, T)))


@FAST
@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 6), st.data())
def test_block_positions_2d(H, W, length, data):
    r, c = data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, W - 1))
    pos = M._block_positions(np.array([r * W + c]), (H, W), length)[0]
    grid = np.zeros((H, W), bool)
    grid.flat[pos] = True
    box = np.zeros((H, W), bool)
    top, left = r - length // 2, c - length // 2
    box[max(top, 0) : max(top + length, 0), max(left, 0) : max(left + length, 0)] = True
    np.testing.assert_array_equal(grid, box)  # the square clipped to the grid
    if length // 2 <= r < H - (length - 1 - length // 2) and length // 2 <= c < W - (length - 1 - length // 2):
        assert grid.sum() == length * length


@FAST
@given(st.integers(1, 4), st.integers(10, 120), st.floats(0.05, 0.9), st.integers(2, 7), st.booleans(), seeds)
def test_block_mask_1d_untrimmed_runs_are_blocks(B, T, p, length, inverse, seed):
    """Without trimming, selected positions form runs of >= mask_length (or touch an edge)."""
    m = M.compute_block_mask_1d((B, T), p, length, rng=rng(seed), inverse_mask=inverse, require_same_masks=False)
    selected = ~m if inverse else m
    for row in selected:
        for start, n in runs(row):
            assert n >= length or start == 0 or start + n == T


@FAST
@given(st.integers(1, 3), st.integers(4, 14), st.integers(4, 14), st.floats(0.05, 0.9), st.integers(2, 4), seeds)
def test_block_mask_2d_untrimmed_cells_lie_in_full_blocks(B, H, W, p, length, seed):
    m = M.compute_block_mask_2d((B, H, W), p, length, rng=rng(seed), inverse_mask=True, require_same_masks=False)
    off = length // 2
    for row in ~m:  # kept = selected blocks
        for r, c in zip(*np.nonzero(row)):
            ok = False
            for cr in range(r - (length - 1 - off), r + off + 1):
                for cc in range(c - (length - 1 - off), c + off + 1):
                    if 0 <= cr < H and 0 <= cc < W:
                        sq = row[max(cr - off, 0) : cr - off + length, max(cc - off, 0) : cc - off + length]
                        ok = ok or sq.all()
            assert ok


# ----------------------------------------------------------------------------------------
# MAE random masking and keep_indices
# ----------------------------------------------------------------------------------------


@FAST
@given(padded_batch(), probs, seeds)
def test_random_mask_exact_count(batch, p, seed):
    B, T, pad = batch
    a = M.random_mask((B, T), p, rng=rng(seed), padding_mask=pad)
    b = M.RandomMask(mask_prob=p)((B, T), padding_mask=pad, rng=seed)
    np.testing.assert_array_equal(a, b.numpy())
    valid = np.full(B, T) if pad is None else (~pad).sum(1)
    expected = (valid - np.floor(valid * (1 - p) + 1e-6)).min()
    np.testing.assert_array_equal(a.sum(1), np.full(B, expected))
    if pad is not None:
        assert not (a & pad).any()


def test_random_mask_fairseq_convention():
    m = M.random_mask((4, 512), 0.48, rng=rng(0))
    assert (m.sum(1) == 512 - int(512 * 0.52)).all()  # keep 266, mask 246


@FAST
@given(st.integers(1, 5), st.integers(1, 60), probs, st.integers(1, 4), seeds)
def test_keep_indices_round_trip(B, T, p, D, seed):
    mask = torch.from_numpy(M.random_mask((B, T), p, rng=rng(seed)))
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed % 2**31))
    ids_keep, ids_restore = M.keep_indices(mask)
    K = int((~mask[0]).sum())
    assert ids_keep.shape == (B, K) and ids_restore.shape == (B, T)
    assert (ids_keep.diff(dim=1) > 0).all()
    assert (~mask.gather(1, ids_keep)).all()
    kept = x.gather(1, ids_keep[..., None].expand(-1, -1, D))
    masked = torch.stack([x[b][mask[b]] for b in range(B)])
    restored = torch.cat([kept, masked], 1).gather(1, ids_restore[..., None].expand(-1, -1, D))
    assert torch.equal(restored, x)


def test_keep_indices_rejects_unequal_counts():
    mask = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match="same number of unmasked"):
        M.keep_indices(mask)


# ----------------------------------------------------------------------------------------
# components and parameter validation
# ----------------------------------------------------------------------------------------


def test_components_return_torch_and_are_seeded():
    shape = (3, 100)
    for gen in (M.SpanMask(), M.RandomMask(), M.InverseBlockMask(dims=1, inverse=False, mask_prob=0.5, mask_length=5)):
        a, b = gen(shape, rng=7), gen(shape, rng=np.random.default_rng(7))
        assert a.dtype == torch.bool and a.shape == shape and torch.equal(a, b)
        assert gen(shape).shape == shape  # rng=None: fresh entropy


@pytest.mark.parametrize(
    "call",
    [
        lambda: M.compute_span_mask((2, 10), 1.5, 2, rng=rng(0)),
        lambda: M.compute_span_mask((2, 10), 0.5, 0, rng=rng(0)),
        lambda: M.compute_span_mask((2, 10), 0.5, 2, rng=rng(0), padding_mask=np.zeros((2, 9), bool)),
        lambda: M.compute_block_mask_1d((2, 10), -0.1, 2, rng=rng(0)),
        lambda: M.compute_block_mask_2d((2, 10), 0.5, 2, rng=rng(0)),  # 10 is not a square
        lambda: M.compute_block_mask_2d((2, 4, 4), 0.5, 2, rng=rng(0), mask_prob_adjust=-1),
        lambda: M.compute_block_mask_2d_beit(4, 4, 17, rng=rng(0)),
        lambda: M.compute_block_mask_2d_beit(4, 4, 3, rng=rng(0), min_aspect=0),
        lambda: M.random_mask((2, 10), 2, rng=rng(0)),
        lambda: M.bert_token_mask(np.zeros((2, 4), int), rng=rng(0), mask_token_id=5, vocab_size=5),
        lambda: M.bert_token_mask(np.zeros((2, 4), int), rng=rng(0), mask_token_id=1, vocab_size=5, replace_prob=0.8, random_prob=0.3),
        lambda: M.SpanMask(mask_length=0),
        lambda: M.InverseBlockMask(dims=3),
        lambda: M.BertMask(mask_prob=-1),
        lambda: M.BlockMask2d(min_aspect=-1),
        lambda: M.RandomMask(mask_prob=True),
    ],
)
def test_bad_parameters_raise_value_error(call):
    with pytest.raises(ValueError) as info:
        call()
    assert isinstance(info.value, SpecError)


def test_pure_functions_require_an_rng():
    with pytest.raises(TypeError, match="rng"):
        M.random_mask((2, 10), 0.5, rng=None)
