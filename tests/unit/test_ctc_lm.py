"""LM-fused CTC decoding: the head's ``decoder`` option, the ARPA builder (``d2v lm build``) and
flashlight-text's beam search with a KenLM word model, on crafted logits and demo transcripts."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from d2v.api import plugins
from d2v.api.errors import SpecError
from d2v.api.interfaces import HeadOutput
from d2v.spec.model import build_component
from d2v_heads.speech.ngram_lm import BOS, EOS, UNK, NGramLM, add_parser, adjusted_counts, discounts, estimate, raw_counts
from d2v_heads.speech.ctc import CTCHead, ctc_beam_ids, ctc_greedy_ids
from d2v_heads.speech.ctc_decoders import DecoderOptions, decoder_options
from d2v_heads.speech.ctc_vocab import CharVocab

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "data" / "speech_demo" / "LibriSpeech"

HAS_FLASHLIGHT = importlib.util.find_spec("flashlight") is not None
needs_flashlight = pytest.mark.skipif(not HAS_FLASHLIGHT, reason="decoder lm_beam needs flashlight-text")


# --------------------------------------------------------------------------- helpers
def transcripts(split: str) -> list[str]:
    lines = []
    for path in sorted((DEMO / split).glob("*/*/*.trans.txt")):
        lines += [line.split(maxsplit=1)[1] for line in path.read_text().splitlines() if line.strip()]
    return lines


def soft_logits(vocab: CharVocab, frames: list[str | dict[str, float]], *, peak: float = 10.0) -> torch.Tensor:
    """Logits ``(T, V)``: a frame is a token (``_`` = blank) peaked at ``peak``, or a
    ``{token: logit}`` dict for an ambiguous frame."""
    logits = torch.zeros(len(frames), len(vocab))
    for t, frame in enumerate(frames):
        for token, value in (frame.items() if isinstance(frame, dict) else [(frame, peak)]):
            logits[t, vocab.blank_id if token == "_" else vocab.token_to_id[token]] = value
    return logits


def spelled(text: str) -> list[str]:
    """One frame per character and a blank after each: ``"AB C"`` -> ``A _ B _ | _ C _``."""
    return [f for c in text.replace(" ", "|") for f in (c, "_")]


def build_lm_cli(sources: list[str], out: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lm", "build", *sources, "--out", str(out), *extra])
    return args.fn(args)


def wer(head: CTCHead, logits: torch.Tensor, lengths: list[int], references: list[str]) -> float:
    output = HeadOutput(logits=logits, extras={"output_lengths": torch.tensor(lengths)})
    return head.summarize(head.eval_counts(output, {"text": references}))["wer"]


# --------------------------------------------------------------------------- ARPA builder
def test_modified_kneser_ney_matches_hand_computed_bigram_model():
    # corpus "A B", "A B", "C B": B's continuation count is 2 ({A, C}), the others' 1
    lm = estimate([["A", "B"], ["A", "B"], ["C", "B"]], order=2)
    adjusted = adjusted_counts(raw_counts([["A", "B"], ["A", "B"], ["C", "B"]], 2))
    assert adjusted[0] == {(BOS,): 3, ("A",): 1, ("B",): 2, ("C",): 1, (EOS,): 1}
    # unigrams: too few counts for D3 -> fallback (0.5, 1, 1.5); total 5, gamma = (3 * 0.5 + 1) / 5 = 0.5,
    # uniform over {</s>, <unk>, A, B, C}
    expected_unigrams = {"A": 0.2, "B": 0.3, "C": 0.2, EOS: 0.2, UNK: 0.1}
    for word, p in expected_unigrams.items():
        assert lm.log10_prob(word) == pytest.approx(math.log10(p), abs=1e-6)
    # bigrams: t1 = t2 = 2, t3 = 1 -> Y = 1/3, D1 = 1/3, D2 = 3/2, D3+ = 3 (not < 3: fallback 1.5)
    assert discounts(adjusted[1]) == pytest.approx((1 / 3, 1.5, 1.5))
    gamma = (1.5 + 1 / 3) / 3  # context <s>: counts 2 (A) and 1 (C)
    assert lm.log10_prob("A", [BOS]) == pytest.approx(math.log10(0.5 / 3 + gamma * 0.2), abs=1e-6)
    assert lm.log10_prob("C", [BOS]) == pytest.approx(math.log10((2 / 3) / 3 + gamma * 0.2), abs=1e-6)
    assert lm.log10_prob("B", [BOS]) == pytest.approx(math.log10(gamma * 0.3), abs=1e-6)  # backed off


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_arpa_round_trip_and_every_context_sums_to_one(tmp_path, order):
    sentences = [text.split() for text in transcripts("train-demo")]
    lm = estimate(sentences, order=order)
    lm.write_arpa(tmp_path / "lm.arpa")
    back = NGramLM.read_arpa(tmp_path / "lm.arpa")
    assert back.order == order and [len(t) for t in back.probs] == [len(t) for t in lm.probs]
    vocabulary = [w for w in back.vocabulary if w != BOS]
    assert {EOS, UNK} <= set(vocabulary) and len(vocabulary) == 22  # 20 words + </s> + <unk>
    contexts = [(), (BOS,), (BOS, "ONE"), ("ONE", "TWO"), ("NINE", "NINE", "NINE"), ("NOT-A-WORD", "GO"), ("STOP",)]
    for context in contexts:
        total = sum(10 ** back.log10_prob(word, context) for word in vocabulary)
        assert total == pytest.approx(1.0, abs=1e-5), context
    # above unigrams the model learned word order: a training sentence beats its words reordered
    if order > 1:
        seen, reordered = "GO LEFT NO ON LEFT".split(), "LEFT ON NO LEFT GO".split()
        assert back.sentence_log10_prob(seen) > back.sentence_log10_prob(reordered)


@needs_flashlight
def test_kenlm_in_flashlight_reads_the_arpa_file_with_the_same_probabilities(tmp_path):
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    assert build_lm_cli([str(_write_lines(tmp_path / "train.txt", transcripts("train-demo")))], tmp_path / "lm.arpa",
                        "--order", "3") == 0
    ours = NGramLM.read_arpa(tmp_path / "lm.arpa")
    words = Dictionary()
    for word in ours.vocabulary:
        words.add_entry(word)
    kenlm = KenLM(str(tmp_path / "lm.arpa"), words)
    generator = torch.Generator().manual_seed(0)
    vocabulary = [w for w in ours.vocabulary if w not in (BOS, UNK)]
    for _ in range(20):
        sentence = [vocabulary[i] for i in torch.randint(len(vocabulary) - 1, (5,), generator=generator).tolist()]
        state, history = kenlm.start(False), [BOS]
        for word in sentence:
            state, score = kenlm.score(state, words.get_index(word))
            assert score == pytest.approx(ours.log10_prob(word, history), abs=1e-4)
            history.append(word)
        assert kenlm.finish(state)[1] == pytest.approx(ours.log10_prob(EOS, history), abs=1e-4)


def test_lm_build_command_errors_are_clear(tmp_path):
    with pytest.raises(SpecError, match="no text file"):
        build_lm_cli([str(tmp_path / "missing.txt")], tmp_path / "lm.arpa")
    with pytest.raises(SpecError, match="no sentences"):
        build_lm_cli([str(_write_lines(tmp_path / "empty.txt", ["", "  "]))], tmp_path / "lm.arpa")
    with pytest.raises(SpecError, match="not an ARPA n-gram line"):
        NGramLM.read_arpa(_write_lines(tmp_path / "bad.arpa", ["\\data\\", "ngram 1=1", "\\1-grams:", "x"]))


# --------------------------------------------------------------------------- decoder options
def test_decoder_options_from_a_spec_and_their_errors(tmp_path):
    lm_path = tmp_path / "lm.arpa"
    estimate([["CAT"], ["DOG"]], order=2).write_arpa(lm_path)
    registry = plugins.registry()

    def head(decoder):
        return build_component(registry, "head", {"name": "ctc", "decoder": decoder}, "model.head", input_dim=4)

    assert head("greedy").decoding == DecoderOptions(name="greedy")
    assert head({"name": "beam", "beam_size": 3}).decoding.beam_size == 3
    assert decoder_options("beam", beam_size=5).beam_size == 5  # the head's beam_size when the mapping has none
    if HAS_FLASHLIGHT:
        built = head({"name": "lm_beam", "lm": str(lm_path), "alpha": 0.7, "beta": 1.5, "beam_size": 20})
        assert (built.decoder, built.decoding.lm_weight, built.decoding.word_score) == ("lm_beam", 0.7, 1.5)
        assert sorted(built._lm_decoder.lexicon) == ["CAT", "DOG"]  # the LM's words; <s> </s> <unk> left out

    binary = tmp_path / "lm.bin"
    binary.write_bytes(b"mmap lm http://kheafield.com/code format version 5\0")
    lexicon = _write_lines(tmp_path / "words.txt", ["CAT", "CAFÉ", "DOG"])
    bad = {
        "unknown decoder 'lm_bem'.*Did you mean 'lm_beam'": {"name": "lm_bem"},
        "alpah: unknown decoder option; did you mean 'alpha'": {"name": "lm_beam", "alpah": 1.0},
        "alpha: the LM weight needs a language model": {"name": "lm_beam", "alpha": 1.0},
        "beta: the word insertion bonus needs words": {"name": "lm_beam", "beta": 1.0},
        "lm: no file at": {"name": "lm_beam", "lm": str(tmp_path / "missing.arpa")},
        "only apply to the LM-fused decoder": {"name": "beam", "lm": str(lm_path)},
        "beam_size: must be an integer >= 1": {"name": "lm_beam", "beam_size": 0},
        "alpha: must be a finite number": {"name": "lm_beam", "lm": str(lm_path), "alpha": "high"},
        "does not list its words; give a lexicon": {"name": "lm_beam", "lm": str(binary)},
    }
    for message, decoder in bad.items():
        with pytest.raises(SpecError, match=message):
            head(decoder)
    if HAS_FLASHLIGHT:
        with pytest.raises(SpecError, match=r"1 words of .* cannot be spelled .*'CAFÉ' \(line 2\)"):
            head({"name": "lm_beam", "lexicon": str(lexicon)})
    with pytest.raises(ValueError, match="model.head.decoder"):
        CTCHead(input_dim=4, decoder=["beam"])


# --------------------------------------------------------------------------- decoding
@needs_flashlight
def test_lm_prefers_the_in_lm_word_over_an_acoustically_equal_spelling(tmp_path):
    lm_path = tmp_path / "lm.arpa"
    corpus = ["I SEE YOU"] * 5 + ["YOU SEE ME", "THE SEA", "I SEE THE SEA", "THE CAT SAT"]
    estimate([line.split() for line in corpus], order=3).write_arpa(lm_path)
    head = CTCHead(input_dim=4)
    vocab = head.vocab
    # "I SE?E YOU": the last E of SEE sounds a bit more like A; "CA?": T and D equal, D a bit higher
    see = soft_logits(vocab, spelled("I SE") + [{"E": 10.0, "A": 10.2}, "_"] + spelled(" YOU"))
    cat = soft_logits(vocab, spelled("THE CA") + [{"T": 10.0, "D": 10.1}, "_"] + spelled(" SAT"))
    for logits, greedy, fused in [(see, "I SEA YOU", "I SEE YOU"), (cat, "THE CAD SAT", "THE CAT SAT")]:
        out = _output(logits)
        head.decoder = "greedy"
        assert head.predict(out) == [greedy]
        head.decoder = {"name": "lm_beam", "lm": str(lm_path), "alpha": 1.0, "beta": 0.0, "beam_size": 16}
        assert head.predict(out) == [fused]
    # without LM weight only the lexicon (every LM word, SEA included) constrains the search:
    # the acoustics choose SEA, and CAD, not a word of the LM, still cannot be written
    head.decoder = {"name": "lm_beam", "lm": str(lm_path), "alpha": 0.0, "beam_size": 16}
    assert head.predict(_output(see)) == ["I SEA YOU"]
    assert head.predict(_output(cat)) == ["THE CAT SAT"]


@needs_flashlight
def test_library_beam_without_lm_agrees_with_the_prefix_beam_search():
    """flashlight's lexicon-free search (``lm_beam`` without LM and lexicon) against d2v's own
    prefix beam search, both wide enough to be near exhaustive. Where they disagree, d2v's answer
    is the more probable labelling (exact CTC probability, torch's ctc_loss): flashlight keeps a
    prefix that ends in a blank and the same prefix ending in its last token as two hypotheses
    and ranks them apart, instead of adding their probabilities. The word delimiter is kept
    improbable here: flashlight also treats a ``|`` at either end of the utterance as the
    implicit word boundary there (the same text, a different labelling)."""
    vocab = CharVocab(["<pad>", "|", "A", "B", "C"])
    head = CTCHead(input_dim=4, vocab=vocab.tokens, decoder={"name": "lm_beam", "beam_size": 64})
    generator = torch.Generator().manual_seed(0)
    agree = 0
    for _ in range(60):
        frames = int(torch.randint(1, 8, (), generator=generator))
        logits = torch.randn(frames, len(vocab), generator=generator) * 2
        logits[:, vocab.word_delimiter_id] = -30.0
        log_probs = torch.log_softmax(logits, -1)[None]
        ours = ctc_beam_ids(log_probs, beam_size=64)[0]
        theirs = head.decode_ids(logits[None])[0]
        agree += ours == theirs
        assert _labelling_log_prob(log_probs[0], ours) >= _labelling_log_prob(log_probs[0], theirs) - 1e-5
    assert agree >= 55


@needs_flashlight
def test_demo_beam_with_lm_beats_greedy_on_noisy_logits(tmp_path):
    """End to end on the demo's words: an LM built by ``d2v lm build`` from the spec's training
    transcripts, dev transcripts rendered as noisy frame scores (greedy makes letter errors), and
    the fused search repairs most of them."""
    assert build_lm_cli([str(ROOT / "experiments" / "asr_demo.yaml")], tmp_path / "lm.arpa", "--order", "3",
                        "--set", f"data.train.root={DEMO}") == 0
    references = transcripts("dev-demo")
    head = CTCHead(input_dim=4)
    generator = torch.Generator().manual_seed(1)
    rows = [soft_logits(head.vocab, spelled(text), peak=4.0) for text in references]
    lengths = [len(r) for r in rows]
    logits = torch.zeros(len(rows), max(lengths), len(head.vocab))
    for b, row in enumerate(rows):
        logits[b, : len(row)] = row + torch.randn(row.shape, generator=generator) * 1.0
    greedy = wer(head, logits, lengths, references)
    head.decoder = {"name": "beam", "beam_size": 16}
    beam = wer(head, logits, lengths, references)
    head.decoder = {"name": "lm_beam", "lm": str(tmp_path / "lm.arpa"), "alpha": 0.5, "beta": 1.0, "beam_size": 32}
    fused = wer(head, logits, lengths, references)
    assert greedy > 20 and beam <= greedy
    print(f"demo dev transcripts, noisy logits: greedy {greedy:.1f}, beam {beam:.1f}, beam+LM {fused:.1f} WER")
    assert fused < greedy / 3, (greedy, beam, fused)


def test_greedy_ids_are_unchanged_by_the_decoder_option():
    head = CTCHead(input_dim=4, decoder={"name": "greedy"})
    logits = soft_logits(head.vocab, spelled("GO UP"))
    assert head.decode_ids(logits[None]) == ctc_greedy_ids(logits[None])


# --------------------------------------------------------------------------- small helpers
def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _output(logits: torch.Tensor) -> HeadOutput:
    return HeadOutput(logits=logits[None], extras={"output_lengths": torch.tensor([logits.shape[0]])})


def _labelling_log_prob(log_probs: torch.Tensor, labelling: list[int]) -> float:
    if not labelling:
        return float(log_probs[:, 0].sum())
    loss = torch.nn.functional.ctc_loss(log_probs[:, None], torch.tensor([labelling]), [log_probs.shape[0]],
                                        [len(labelling)], blank=0, reduction="sum", zero_infinity=False)
    return -float(loss)
