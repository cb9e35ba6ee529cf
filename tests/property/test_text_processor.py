"""Properties of the text processor: QA windows, pair truncation, word-label alignment, masking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2v.ssl.masking import BertMask
from d2v_text.processor import TextProcessor, truncate_longest_first, window_starts
from d2v_text.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = Path(__file__).resolve().parents[2] / "experiments" / "data" / "text_demo" / "tokenizer"
WORDS = ["Paris", "born", "in", "1955", "the", "Acme", "Corp", "café", "東京", "🙂", "engineer", "works", "x",
         "Zenith", "Group", "naïve", ",", ".", "and", "Monday"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

TOKENIZER = load_tokenizer(VOCAB)


@FAST
@given(n=st.integers(0, 300), size=st.integers(2, 64), data=st.data())
def test_windows_cover_every_token_with_stride_overlap(n, size, data):
    stride = data.draw(st.integers(0, size - 1))
    starts = window_starts(n, size, stride)
    assert starts[0] == 0 and starts[-1] + size >= n
    covered = set()
    for s in starts:
        covered |= set(range(s, min(s + size, n)))
    assert covered == set(range(n))
    for a, b in zip(starts, starts[1:]):
        assert b - a == size - stride  # consecutive windows share exactly `stride` tokens
    # any span of at most stride + 1 tokens lies wholly inside some window
    length = data.draw(st.integers(1, stride + 1))
    if n >= length:
        first = data.draw(st.integers(0, n - length))
        assert any(s <= first and first + length <= s + size for s in starts)


@FAST
@given(n1=st.integers(0, 200), n2=st.integers(0, 200), budget=st.integers(0, 200))
def test_longest_first_equals_one_token_at_a_time(n1, n2, budget):
    a, b = n1, n2
    while a + b > budget:
        if a > b:
            a -= 1
        else:
            b -= 1
    assert truncate_longest_first(n1, n2, budget) == (a, b)


@FAST
@given(words=st.lists(st.sampled_from(WORDS), min_size=3, max_size=60), data=st.data())
def test_question_answering_windows_contain_the_answer_when_it_fits(words, data):
    context = " ".join(words)
    k = data.draw(st.integers(0, len(words) - 1))
    span = data.draw(st.integers(1, min(3, len(words) - k)))
    start_char = len(" ".join(words[:k])) + (1 if k else 0)
    answer = " ".join(words[k:k + span])
    max_length = data.draw(st.integers(24, 48))
    stride = data.draw(st.integers(4, 10))
    proc = TextProcessor(tokenizer=str(VOCAB), max_length=max_length, stride=stride)
    example = {"id": "q", "question": "Where?", "context": context,
               "answers": [{"text": answer, "answer_start": start_char}]}
    rows = proc.load(example, train=True)["rows"]
    assert all(len(r["input_ids"]) <= max_length for r in rows)
    pieces = TOKENIZER.pieces(context)
    answer_tokens = [i for i, (s, e) in enumerate(pieces.offsets) if s < start_char + len(answer) and e > start_char]
    hits = [r for r in rows if r["start"] > 0]
    for r in hits:  # every labelled window points exactly at the answer
        s, e = r["offsets"][r["start"]][0], r["offsets"][r["end"]][1]
        assert context[s:e] == answer
    for r in rows:
        if r["start"] == 0:
            assert r["end"] == 0
    if len(answer_tokens) <= stride + 1:
        assert hits, "an answer of at most stride + 1 tokens is inside at least one window"


@FAST
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=40), max_length=st.integers(8, 64), data=st.data())
def test_word_labels_land_on_first_subtokens(words, max_length, data):
    labels = data.draw(st.lists(st.integers(0, 8), min_size=len(words), max_size=len(words)))
    proc = TextProcessor(tokenizer=str(VOCAB), max_length=max_length)
    batch = proc.collate([proc.load({"id": "s", "words": words, "word_label_ids": labels,
                                     "word_labels": [str(x) for x in labels]}, train=True)])
    word_ids, row = batch["word_ids"][0], batch["labels"][0].tolist()
    assert len(row) <= max_length
    kept = sorted({w for w in word_ids if w is not None})
    assert kept == list(range(len(kept)))  # truncation keeps a prefix of the words
    firsts = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    assert [row[i] for i in firsts] == labels[: len(firsts)]
    assert sum(x != -100 for x in row) == len(firsts)
    if len(kept) < len(words):
        assert proc.truncated_examples == 1


@FAST
@given(texts=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=30).map(" ".join), min_size=1, max_size=6),
       mask_prob=st.sampled_from([0.15, 0.3, 0.5]), seed=st.integers(0, 2**32 - 1))
def test_bert_masking_never_touches_specials_or_padding(texts, mask_prob, seed):
    proc = TextProcessor(tokenizer=str(VOCAB), max_length=32, masking=BertMask(mask_prob=mask_prob))
    rng = np.random.default_rng(seed)
    batch = proc.collate([proc.load({"id": str(i), "text": t}, train=True, rng=rng) for i, t in enumerate(texts)])
    teacher, sel = batch["teacher_inputs"], batch["corrupted_mask"]
    special = torch.isin(teacher, torch.tensor(TOKENIZER.all_special_ids))
    assert not (sel & special).any() and not (sel & batch["padding_mask"]).any()
    n_valid = (~special & ~batch["padding_mask"]).sum(1)
    expected = torch.clamp(torch.floor(mask_prob * n_valid + 0.5), min=1).long()
    assert sel.sum(1).tolist() == expected.tolist()
    changed = batch["inputs"] != teacher
    assert not (changed & ~sel).any()  # only selected tokens may change
    replaced = batch["inputs"][changed]
    assert not torch.isin(replaced, torch.tensor([i for i in TOKENIZER.all_special_ids if i != proc.mask_token_id])).any()
