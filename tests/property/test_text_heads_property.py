"""Properties of the text heads' pure functions: entity chunking equals a literal transcription of
seqeval's default algorithm (run the way seqeval runs it, on all sentences joined with ``O``), and
n-best span extraction equals an exhaustive search and finds planted answers across windows."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from d2v_heads.text.entities import entity_counts, entity_scores, get_entities
from d2v_heads.text.question_answering import best_answer

# --------------------------------------------------------------------------- seqeval reference


def reference_chunks(seq):
    """seqeval ``get_entities`` (default mode): its if-chains, one condition per line."""
    if any(isinstance(s, list) for s in seq):
        seq = [tag for sentence in seq for tag in sentence + ["O"]]
    prev_tag, prev_type, begin, chunks = "O", "", 0, []
    for i, chunk in enumerate(seq + ["O"]):
        tag = chunk[0]
        type_ = chunk[1:].split("-", maxsplit=1)[-1] or "_"
        end = False
        if prev_tag == "E":
            end = True
        if prev_tag == "S":
            end = True
        if prev_tag == "B" and tag == "B":
            end = True
        if prev_tag == "B" and tag == "S":
            end = True
        if prev_tag == "B" and tag == "O":
            end = True
        if prev_tag == "I" and tag == "B":
            end = True
        if prev_tag == "I" and tag == "S":
            end = True
        if prev_tag == "I" and tag == "O":
            end = True
        if prev_tag != "O" and prev_tag != "." and prev_type != type_:
            end = True
        if end:
            chunks.append((prev_type, begin, i - 1))
        start = False
        if tag == "B":
            start = True
        if tag == "S":
            start = True
        if prev_tag == "E" and tag == "E":
            start = True
        if prev_tag == "E" and tag == "I":
            start = True
        if prev_tag == "S" and tag == "E":
            start = True
        if prev_tag == "S" and tag == "I":
            start = True
        if prev_tag == "O" and tag == "E":
            start = True
        if prev_tag == "O" and tag == "I":
            start = True
        if tag != "O" and tag != "." and prev_type != type_:
            start = True
        if start:
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def reference_scores(y_true, y_pred):
    """seqeval's micro precision/recall/F1 (per-type sets of (start, end), summed) and accuracy."""
    true_by_type, pred_by_type = {}, {}
    for type_, s, e in reference_chunks(y_true):
        true_by_type.setdefault(type_, set()).add((s, e))
    for type_, s, e in reference_chunks(y_pred):
        pred_by_type.setdefault(type_, set()).add((s, e))
    types = set(true_by_type) | set(pred_by_type)
    tp = sum(len(true_by_type.get(t, set()) & pred_by_type.get(t, set())) for t in types)
    n_pred = sum(len(v) for v in pred_by_type.values())
    n_true = sum(len(v) for v in true_by_type.values())
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    flat_true = [t for s in y_true for t in s]
    flat_pred = [t for s in y_pred for t in s]
    acc = sum(a == b for a, b in zip(flat_true, flat_pred)) / len(flat_true)
    return 100 * p, 100 * r, 100 * f, 100 * acc


TAG = st.sampled_from(["O", "O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "I-MISC", "B", "I"])
SENTENCE = st.lists(TAG, min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(SENTENCE)
def test_chunks_equal_seqeval_on_one_sentence(tags):
    assert get_entities(tags) == reference_chunks(tags)


@settings(max_examples=200, deadline=None)
@given(st.lists(SENTENCE.flatmap(lambda s: st.tuples(st.just(s), st.lists(TAG, min_size=len(s), max_size=len(s)))),
                min_size=1, max_size=6))
def test_additive_counts_equal_seqeval_on_a_corpus(pairs):
    y_true = [list(t) for t, _ in pairs]
    y_pred = [list(p) for _, p in pairs]
    totals: dict[str, float] = {}
    for gold, pred in pairs:
        for key, value in entity_counts(gold, pred).items():
            totals[key] = totals.get(key, 0.0) + value
    ours = entity_scores(totals)
    p, r, f, acc = reference_scores(y_true, y_pred)
    assert abs(ours["precision"] - p) < 1e-9 and abs(ours["recall"] - r) < 1e-9
    assert abs(ours["f1"] - f) < 1e-9 and abs(ours["accuracy"] - acc) < 1e-9


# --------------------------------------------------------------------------- span extraction


def exhaustive_best(windows, context, max_answer_length):
    best = None
    for start, end, offsets in windows:
        for s in range(len(offsets)):
            for e in range(s, min(len(offsets), s + max_answer_length)):
                if offsets[s] is None or offsets[e] is None:
                    continue
                score = start[s] + end[e]
                if best is None or score > best[0]:
                    best = (score, context[offsets[s][0]: offsets[e][1]])
    return best


@st.composite
def windowed_logits(draw):
    context = "".join(draw(st.lists(st.sampled_from("abcde "), min_size=4, max_size=40)))
    size = draw(st.integers(3, 12))
    stride = draw(st.integers(1, size))
    windows = []
    begin = 0
    while True:
        chars = list(range(begin, min(begin + size, len(context))))
        offsets = [None, None] + [(c, c + 1) for c in chars] + [None]
        n = len(offsets) + draw(st.integers(0, 3))  # trailing padding logits are never used
        logit = st.floats(-5, 5, allow_nan=False).map(lambda x: round(x, 3))
        start = draw(st.lists(logit, min_size=n, max_size=n))
        end = draw(st.lists(logit, min_size=n, max_size=n))
        windows.append((start, end, offsets))
        if begin + size >= len(context):
            break
        begin += stride
    return context, windows


@settings(max_examples=150, deadline=None)
@given(windowed_logits(), st.integers(1, 6))
def test_n_best_equals_exhaustive_search_when_n_covers_the_window(data, max_answer_length):
    context, windows = data
    found = best_answer(windows, context, n_best_size=100, max_answer_length=max_answer_length)
    expected = exhaustive_best(windows, context, max_answer_length)
    assert abs(found["score"] - expected[0]) < 1e-9  # ties may pick another span of the same score


@settings(max_examples=150, deadline=None)
@given(windowed_logits(), st.data())
def test_planted_answer_is_found_in_whichever_window_holds_it(data, draw):
    context, windows = data
    w = draw.draw(st.integers(0, len(windows) - 1))
    start, end, offsets = windows[w]
    context_tokens = [i for i, o in enumerate(offsets) if o is not None]
    s = draw.draw(st.sampled_from(context_tokens))
    e = draw.draw(st.sampled_from([i for i in context_tokens if s <= i < s + 5]))
    start[s], end[e] = 20.0, 20.0
    # a higher-scoring pair outside the context (question tokens) must be ignored
    start[1], end[1] = 30.0, 30.0
    found = best_answer(windows, context, n_best_size=3, max_answer_length=5)
    assert found["text"] == context[offsets[s][0]: offsets[e][1]]
    # v2: the null score (position 0, the lowest over the windows) only wins past the threshold
    for window_start, window_end, _ in windows:
        window_start[0], window_end[0] = 25.0, 25.0
    assert best_answer(windows, context, n_best_size=3, max_answer_length=5, version_2_with_negative=True)["text"] == ""
    kept = best_answer(windows, context, n_best_size=3, max_answer_length=5, version_2_with_negative=True,
                       null_score_diff_threshold=100.0)
    assert kept["text"] == context[offsets[s][0]: offsets[e][1]]
