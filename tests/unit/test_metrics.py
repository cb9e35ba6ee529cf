"""d2v_heads.speech.error_rates: edit distance, word and character errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2v_heads.speech.error_rates import char_errors, edit_distance, error_rate, normalize_whitespace, word_errors


@pytest.mark.parametrize(
    "ref, hyp, expected",
    [
        ("kitten", "sitting", 3),
        ("sitting", "kitten", 3),
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("flaw", "lawn", 2),
        ("intention", "execution", 5),
        ("same", "same", 0),
        ("abc", "cba", 2),
        ("a", "b", 1),
    ],
)
def test_edit_distance_hand_cases(ref, hyp, expected):
    assert edit_distance(ref, hyp) == expected


def test_edit_distance_on_word_lists_and_tuples():
    assert edit_distance(["the", "cat", "sat"], ["the", "cat", "sat"]) == 0
    assert edit_distance(["the", "cat", "sat"], ["a", "cat", "sat", "down"]) == 2
    assert edit_distance((1, 2, 3), [1, 3]) == 1
    assert edit_distance([], ["x"]) == 1


@pytest.mark.parametrize(
    "ref, hyp, expected",
    [
        ("the cat sat on the mat", "the cat sat on the mat", (0, 6)),
        ("the cat sat on the mat", "the cat sit on mat", (2, 6)),  # 1 substitution + 1 deletion
        ("the cat sat", "the cat sat down", (1, 3)),  # 1 insertion
        ("a b c d", "a x c", (2, 4)),
        ("hello world", "", (2, 2)),
        ("", "extra words", (2, 0)),
        ("  hello   world ", "hello world", (0, 2)),  # whitespace never counts
    ],
)
def test_word_errors_known_pairs(ref, hyp, expected):
    assert word_errors(ref, hyp) == expected


def test_char_errors_count_spaces_of_normalised_text():
    assert char_errors("ab cd", "abcd") == (1, 5)  # the dropped space is one error
    assert char_errors("  ab   cd ", "ab cd") == (0, 5)
    assert char_errors("hello world", "hello word") == (1, 11)
    assert char_errors("", "ab") == (2, 0)


def test_error_rate_and_whitespace():
    assert error_rate(1, 4) == 0.25
    assert error_rate(0, 0) == 0.0
    assert error_rate(3, 0) == 3.0  # only insertions: denominator taken as 1, stays finite
    assert normalize_whitespace("\t a  b\nc ") == "a b c"


def test_edit_distance_is_fast_enough_for_long_sentences():
    ref = ("the quick brown fox jumps over the lazy dog " * 20).split()
    hyp = ("the quick brown cat jumps over a lazy dog " * 20).split()
    assert edit_distance(ref, hyp) == 40
    assert edit_distance(" ".join(ref), " ".join(hyp)) > 0


def _full_matrix_levenshtein(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(
                table[i - 1][j] + 1,
                table[i][j - 1] + 1,
                table[i - 1][j - 1] + (a[i - 1] != b[j - 1]),
            )
    return table[len(a)][len(b)]


short_text = st.text(alphabet="abc ", max_size=12)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(short_text, short_text, short_text)
def test_edit_distance_matches_full_matrix_and_is_a_metric(a, b, c):
    d_ab = edit_distance(a, b)
    assert d_ab == _full_matrix_levenshtein(a, b)
    assert d_ab == edit_distance(b, a)
    assert (d_ab == 0) == (a == b)
    assert abs(len(a) - len(b)) <= d_ab <= max(len(a), len(b))
    assert edit_distance(a, c) <= d_ab + edit_distance(b, c)
