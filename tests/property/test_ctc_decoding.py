"""Properties of CTC decoding (d2v_heads.speech.ctc): round trips, beam vs greedy, padding."""

from __future__ import annotations

import itertools
import math
import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2v.api.interfaces import HeadOutput
from d2v_heads.speech.ctc import CTCHead, collapse_ctc, ctc_greedy_ids, ctc_prefix_beam_search
from d2v_heads.speech.ctc_vocab import CharVocab

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HEAD = CTCHead(input_dim=4)  # LibriSpeech vocabulary; decoding never touches the weights
VOCAB = HEAD.vocab
BLANK = VOCAB.blank_id
LETTERS = "".join(t for t in VOCAB.tokens if len(t) == 1 and t != "|")  # letters and apostrophe
TEXT = st.text(alphabet=LETTERS + LETTERS.lower() + "  ", max_size=30)
PROPERTY = settings(max_examples=120, deadline=None, derandomize=True)


@st.composite
def text_and_path(draw):
    """A transcript and a random CTC path for it: every label repeated 1-3 times, 0-2 blanks
    between labels (at least one between equal neighbours), 0-2 blanks at both ends."""
    text = draw(TEXT)
    ids = VOCAB.encode(text)
    path = [BLANK] * draw(st.integers(0, 2))
    for i, token in enumerate(ids):
        path += [token] * draw(st.integers(1, 3))
        must_separate = i + 1 < len(ids) and ids[i + 1] == token
        path += [BLANK] * draw(st.integers(1 if must_separate else 0, 2))
    path += [BLANK] * draw(st.integers(0, 2))
    return text, ids, path


def one_hot_logits(path: list[int], peak: float = 25.0) -> torch.Tensor:
    logits = torch.zeros(len(path), len(VOCAB))
    if path:
        logits[torch.arange(len(path)), torch.tensor(path)] = peak
    return logits


def one_hot_log_probs(path: list[int]) -> torch.Tensor:
    """Exactly one-hot distributions: log-probs 0 on the path, -inf elsewhere."""
    log_probs = torch.full((len(path), len(VOCAB)), -math.inf)
    if path:
        log_probs[torch.arange(len(path)), torch.tensor(path)] = 0.0
    return log_probs


@PROPERTY
@given(text_and_path())
def test_encode_path_greedy_decode_round_trips(case):
    text, ids, path = case
    assert collapse_ctc(path, BLANK) == ids
    expected = " ".join(text.upper().split())
    logits = one_hot_logits(path)[None]
    HEAD.decoder = "greedy"
    assert HEAD.predict(HeadOutput(logits=logits), {}) == [expected]
    assert HEAD.references({"text": [text]}) == [expected]


@settings(max_examples=80, deadline=None, derandomize=True)
@given(text_and_path(), st.integers(1, 8))
def test_beam_equals_greedy_on_one_hot_distributions(case, beam_size):
    _, ids, path = case
    best, logp = ctc_prefix_beam_search(one_hot_log_probs(path), beam_size=beam_size, blank=BLANK)
    assert best == ids and logp == 0.0
    logits = one_hot_logits(path)[None]
    peaked = torch.log_softmax(logits[0], -1)
    assert ctc_prefix_beam_search(peaked, beam_size=beam_size, blank=BLANK)[0] == ctc_greedy_ids(logits)[0] == ids


def _labelling_log_probs(log_probs: torch.Tensor, blank: int) -> dict[tuple[int, ...], float]:
    """log P(labelling) for every labelling, by enumerating every frame path."""
    frames, vocab_size = log_probs.shape
    table: dict[tuple[int, ...], float] = {}
    rows = log_probs.tolist()
    for path in itertools.product(range(vocab_size), repeat=frames):
        key = tuple(collapse_ctc(path, blank))
        lp = sum(rows[t][s] for t, s in enumerate(path))
        table[key] = lp if key not in table else max(table[key], lp) + math.log1p(math.exp(-abs(table[key] - lp)))
    return table


small_logits = st.integers(1, 4).flatmap(
    lambda frames: st.lists(
        st.lists(st.floats(-4, 4, allow_nan=False), min_size=3, max_size=3), min_size=frames, max_size=frames
    )
)


@PROPERTY
@given(small_logits, st.integers(1, 3))
def test_beam_search_scores_are_exact_and_a_wide_beam_finds_the_best_labelling(rows, beam_size):
    log_probs = torch.log_softmax(torch.tensor(rows, dtype=torch.float64), -1)
    table = _labelling_log_probs(log_probs, blank=0)
    # a beam wide enough to hold every labelling is exact
    best, logp = ctc_prefix_beam_search(log_probs, beam_size=64, blank=0)
    assert math.isclose(logp, max(table.values()), abs_tol=1e-9)
    assert math.isclose(table[tuple(best)], logp, abs_tol=1e-9)
    # a narrow beam never over-estimates its labelling's probability
    best, logp = ctc_prefix_beam_search(log_probs, beam_size=beam_size, blank=0)
    assert logp <= table[tuple(best)] + 1e-9
    # and the wide beam is never worse than greedy
    greedy = tuple(ctc_greedy_ids(log_probs[None])[0])
    assert max(table.values()) >= table[greedy]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.lists(text_and_path(), min_size=1, max_size=4), st.integers(0, 3), st.integers(0, 2**31))
def test_batched_predict_respects_padding(cases, extra_frames, seed):
    paths = [path for _, _, path in cases]
    frames = max(len(p) for p in paths) + extra_frames
    logits = torch.zeros(len(paths), frames, len(VOCAB))
    generator = torch.Generator().manual_seed(seed)
    for b, path in enumerate(paths):
        # garbage (random peaked tokens) in the padded frames must be ignored
        garbage = torch.randint(len(VOCAB), (frames - len(path),), generator=generator).tolist()
        logits[b] = one_hot_logits(path + garbage)
    lengths = torch.tensor([len(p) for p in paths])
    expected = [" ".join(text.upper().split()) for text, _, _ in cases]
    for decoder in ("greedy", "beam"):
        HEAD.decoder = decoder
        out = HeadOutput(logits=logits, extras={"output_lengths": lengths})
        assert HEAD.predict(out, {}) == expected
    HEAD.decoder = "greedy"


_tokenizer = None


def _hf_tokenizer(tmp_dir: str):
    global _tokenizer
    if _tokenizer is None:
        from transformers import Wav2Vec2CTCTokenizer

        path = os.path.join(tmp_dir, "vocab.json")
        VOCAB.to_json(path)
        _tokenizer = Wav2Vec2CTCTokenizer(path)
    return _tokenizer


PLAIN_IDS = [BLANK, VOCAB.word_delimiter_id] + [VOCAB.token_to_id[c] for c in LETTERS]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(PLAIN_IDS), max_size=40))
def test_greedy_decode_matches_hf_tokenizer(tmp_path_factory, frame_ids):
    tokenizer = _hf_tokenizer(str(tmp_path_factory.getbasetemp()))
    ours = VOCAB.decode(collapse_ctc(frame_ids, BLANK))
    theirs = tokenizer.decode(frame_ids)  # groups repeats, drops <pad>, "|" -> " "
    assert ours == " ".join(theirs.split())


@PROPERTY
@given(st.lists(st.text(alphabet="abcde '", max_size=10), max_size=6))
def test_built_vocab_encodes_its_own_texts_without_unk(texts):
    vocab = CharVocab.build(texts)
    assert vocab.tokens[:5] == ["<pad>", "<s>", "</s>", "<unk>", "|"]
    for text in texts:
        ids = vocab.encode(text)
        assert vocab.unk_id not in ids
        assert vocab.decode(ids) == " ".join(text.split())
    assert CharVocab.from_json(vocab.to_json()) == vocab
