"""The CTC head (d2v_heads.speech.ctc): vocabulary, loss (brute force and HF parity), decoding, metrics."""

from __future__ import annotations

import itertools
import json
import math
import os

import pytest
import torch

from d2v.api.interfaces import EncoderOutput, Head, HeadOutput
from d2v_heads.speech import ctc
from d2v_heads.speech.ctc import CTCHead, collapse_ctc, ctc_greedy_ids, ctc_prefix_beam_search
from d2v_heads.speech.ctc_vocab import LIBRISPEECH_TOKENS, CharVocab

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

LS_ORDER = ["<pad>", "<s>", "</s>", "<unk>", "|"] + list("ETAONIHSRDLUMWCFGYPBVK'XJQZ")


# --------------------------------------------------------------------------- helpers
def path_logits(vocab: CharVocab, path: str, *, peak: float = 20.0) -> torch.Tensor:
    """Logits ``(T, V)`` peaked on one token per frame; ``_`` is the blank, other
    characters are tokens (``|`` the word delimiter)."""
    ids = [vocab.blank_id if c == "_" else vocab.token_to_id[c] for c in path]
    logits = torch.zeros(len(ids), len(vocab))
    logits[torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)] = peak
    return logits


def head_output(logits: torch.Tensor, lengths=None) -> HeadOutput:
    extras = {} if lengths is None else {"output_lengths": torch.as_tensor(lengths)}
    return HeadOutput(logits=logits, extras=extras)


def brute_force_nll(log_probs: torch.Tensor, target: list[int], blank: int) -> float:
    """-log P(target) by summing the probability of every frame path that collapses to it."""
    log_probs = log_probs.detach()
    frames, vocab_size = log_probs.shape
    total = -math.inf
    for path in itertools.product(range(vocab_size), repeat=frames):
        if collapse_ctc(path, blank) == target:
            lp = float(sum(log_probs[t, s] for t, s in enumerate(path)))
            total = max(total, lp) + math.log1p(math.exp(-abs(total - lp))) if total != -math.inf else lp
    return -total


# --------------------------------------------------------------------------- plugin
def test_module_registers_the_ctc_head():
    seen = []
    ctc.d2v_register(register=lambda kind, name, factory, **options: seen.append((kind, name, factory, options)))
    assert len(seen) == 1
    kind, name, factory, options = seen[0]
    assert (kind, name) == ("head", "ctc") and options["summary"] and options["modalities"] == ("audio",)
    module_name, _, attr = factory.partition(":")
    assert getattr(__import__(module_name, fromlist=[attr]), attr) is CTCHead


def test_entry_point_builds_the_head(monkeypatch):
    from d2v.api import plugins

    monkeypatch.setenv("D2V_LOAD_PLUGINS", "head-ctc")
    plugins.reset()
    try:
        component = plugins.registry().get("head", "ctc")
        assert component.plugin == "head-ctc"
        params = component.parameters()
        assert params["vocab"] == "librispeech" and params["ctc_loss_reduction"] == "sum"
        assert params["final_dropout"] == 0.1 and params["ctc_zero_infinity"] is False
        head = component.build(input_dim=8)
        assert isinstance(head, Head) and head.proj.out_features == 32
    finally:
        plugins.reset()


# --------------------------------------------------------------------------- vocabulary
def test_librispeech_vocab_is_the_hf_960h_order():
    vocab = CharVocab.builtin("librispeech")
    assert vocab.tokens == LS_ORDER == list(LIBRISPEECH_TOKENS)
    assert len(vocab) == 32
    assert (vocab.blank_id, vocab.unk_id, vocab.word_delimiter_id) == (0, 3, 4)
    assert vocab.case == "upper"


def test_encode_decode():
    vocab = CharVocab.builtin("librispeech")
    ids = vocab.encode("  hello   World ")
    assert [vocab.tokens[i] for i in ids] == list("HELLO|WORLD")
    assert vocab.encode("a1b") == [vocab.token_to_id["A"], vocab.unk_id, vocab.token_to_id["B"]]
    assert vocab.encode("don't") == [vocab.token_to_id[c] for c in "DON'T"]
    assert vocab.decode(ids) == "HELLO WORLD"
    # specials vanish, delimiters become (collapsed, stripped) spaces
    assert vocab.decode([4, 0, 1, 7, 2, 3, 4, 4, 6, 4]) == "A T"
    assert vocab.decode([]) == ""


def test_lowercase_and_mixed_case_vocabs_match_case():
    lower = CharVocab(["<pad>", "<unk>", "|", "a", "b"])
    assert lower.case == "lower" and lower.encode("AB a") == [3, 4, 2, 3]
    mixed = CharVocab(["<pad>", "<unk>", "|", "a", "B"])
    assert mixed.case is None and mixed.encode("aB b") == [3, 4, 2, 1]


def test_build_orders_by_frequency_then_alphabet():
    vocab = CharVocab.build(["abba cab", "dd c"])
    # counts: a3 b3 c2 d2 -> ties broken alphabetically
    assert vocab.tokens == ["<pad>", "<s>", "</s>", "<unk>", "|", "a", "b", "c", "d"]
    assert CharVocab.build(["Ab"], case="upper").tokens[5:] == ["A", "B"]
    assert CharVocab.build([]).tokens == ["<pad>", "<s>", "</s>", "<unk>", "|"]
    with pytest.raises(ValueError):
        CharVocab.build(["x"], case="title")


def test_vocab_json_round_trip(tmp_path):
    vocab = CharVocab.builtin("librispeech")
    text = vocab.to_json(tmp_path / "vocab.json")
    assert json.loads(text) == {t: i for i, t in enumerate(LS_ORDER)}
    assert CharVocab.from_json(tmp_path / "vocab.json") == vocab
    assert CharVocab.from_json(str(tmp_path)) == vocab  # a checkpoint directory
    assert CharVocab.from_json(text) == vocab
    assert CharVocab.from_json(json.dumps(LS_ORDER)) == vocab
    with pytest.raises(ValueError):
        CharVocab.from_dict({"a": 0, "b": 2})
    with pytest.raises(ValueError):
        CharVocab(["a", "a"])


def test_vocab_matches_hf_wav2vec2_ctc_tokenizer(tmp_path):
    from transformers import Wav2Vec2CTCTokenizer

    vocab = CharVocab.builtin("librispeech")
    vocab.to_json(tmp_path / "vocab.json")
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"))
    for text in ["HELLO WORLD", "IT'S A TEST", "A"]:
        assert tokenizer(text).input_ids == vocab.encode(text)
    frame_ids = [0, 11, 11, 5, 0, 15, 15, 0, 15, 8, 4, 4, 0, 18, 8, 13, 15, 14, 0]
    assert tokenizer.decode(frame_ids) == vocab.decode(collapse_ctc(frame_ids, 0)) == "HELLO WORLD"


# --------------------------------------------------------------------------- construction
def test_constructor_options(tmp_path):
    head = CTCHead(input_dim=8)
    assert (head.input_dim, head.vocab_size, head.final_dropout) == (8, 32, 0.1)
    assert (head.ctc_loss_reduction, head.ctc_zero_infinity, head.decoder, head.beam_size) == ("sum", False, "greedy", 8)
    assert isinstance(head.dropout, torch.nn.Dropout) and head.dropout.p == 0.1
    assert head.proj.in_features == 8 and head.proj.out_features == 32
    assert list(dict(head.named_parameters())) == ["proj.weight", "proj.bias"]
    assert head.hf_config() == {
        "vocab_size": 32, "final_dropout": 0.1, "ctc_loss_reduction": "sum", "ctc_zero_infinity": False,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }
    assert CTCHead(input_dim=4, vocab=["<pad>", "|", "a"]).proj.out_features == 3
    CharVocab(["<pad>", "<unk>", "|", "x"]).to_json(tmp_path / "vocab.json")
    assert CTCHead(input_dim=4, vocab=str(tmp_path / "vocab.json")).vocab.tokens == ["<pad>", "<unk>", "|", "x"]
    assert CTCHead(input_dim=4, vocab=str(tmp_path)).vocab_size == 4
    built = CTCHead.from_transcripts(["ab", "b"], input_dim=4, final_dropout=0.0)
    assert built.vocab.tokens[5:] == ["b", "a"]
    for bad in [dict(ctc_loss_reduction="none"), dict(decoder="lm"), dict(beam_size=0), dict(vocab="no-such-vocab")]:
        with pytest.raises(ValueError):
            CTCHead(input_dim=4, **bad)


# --------------------------------------------------------------------------- loss
TINY = ["<pad>", "A", "B"]


@pytest.mark.parametrize("target", [[1], [1, 2], [1, 1], [2, 1, 2], []])
def test_ctc_loss_equals_brute_force_sum_over_alignments(target):
    torch.manual_seed(len(target))
    head = CTCHead(input_dim=4, vocab=TINY, final_dropout=0.0)
    hidden = torch.randn(1, 3, 4)
    out = head(EncoderOutput(last_hidden_state=hidden), {"labels": torch.tensor([target + [-100] * 2])})
    expected = brute_force_nll(torch.log_softmax(out.logits[0].double(), -1), target, blank=0)
    if math.isinf(expected):  # [2, 1, 2] fits T=3, so only impossible targets would be inf
        assert torch.isinf(out.loss)
    else:
        assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_ctc_loss_hand_computed_t2():
    # T=2, p(blank)=0.6, p(A)=0.4, p(B)=0 -> P("A") = 0.4*0.4 + 0.6*0.4 + 0.4*0.6 = 0.64
    head = CTCHead(input_dim=1, vocab=TINY, final_dropout=0.0)
    logits = torch.log(torch.tensor([[[0.6, 0.4, 1e-30]] * 2]))
    loss, per = head.ctc_loss(logits, torch.tensor([[1]]), torch.tensor([2]))
    assert loss.item() == pytest.approx(-math.log(0.64), abs=1e-6)
    loss, _ = head.ctc_loss(logits, torch.tensor([[-100]]), torch.tensor([2]))
    assert loss.item() == pytest.approx(-math.log(0.36), abs=1e-6)


def test_loss_reductions_and_padding():
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 6)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 8:] = True
    labels = torch.tensor([[5, 6, 7, 4, 8], [9, 10, -100, -100, -100]])
    summed = CTCHead(input_dim=6, final_dropout=0.0)
    mean = CTCHead(input_dim=6, final_dropout=0.0, ctc_loss_reduction="mean")
    mean.load_state_dict(summed.state_dict())
    out_sum = summed(EncoderOutput(last_hidden_state=hidden, padding_mask=padding), {"labels": labels})
    out_mean = mean(EncoderOutput(last_hidden_state=hidden, padding_mask=padding), {"labels": labels})
    per = out_sum.extras["utterance_loss"]
    assert out_sum.extras["output_lengths"].tolist() == [12, 8]
    assert out_sum.loss.item() == pytest.approx(per.sum().item(), rel=1e-6)
    assert out_mean.loss.item() == pytest.approx((per[0] / 5 + per[1] / 2).item() / 2, rel=1e-6)
    # padded frames carry no loss: changing them changes nothing
    hidden2 = hidden.clone()
    hidden2[1, 8:] = 100.0
    again = summed(EncoderOutput(last_hidden_state=hidden2, padding_mask=padding), {"labels": labels})
    assert again.loss.item() == pytest.approx(out_sum.loss.item(), rel=1e-6)
    # blank-padded labels (pad id 0) are ignored like -100, as in HF
    blank_padded = labels.masked_fill(labels == -100, 0)
    assert summed.ctc_loss(out_sum.logits, blank_padded, torch.tensor([12, 8]))[0].item() == pytest.approx(
        out_sum.loss.item(), rel=1e-6
    )


def test_text_batches_are_encoded_and_equal_labels():
    torch.manual_seed(1)
    head = CTCHead(input_dim=6, final_dropout=0.0)
    hidden = torch.randn(2, 30, 6)
    texts = ["hello world", "it's"]
    from_text = head(EncoderOutput(last_hidden_state=hidden), {"text": texts})
    labels = from_text.extras["labels"]
    assert labels.tolist()[1] == head.vocab.encode("IT'S") + [-100] * 7
    from_labels = head(EncoderOutput(last_hidden_state=hidden), {"labels": labels})
    as_lists = head(EncoderOutput(last_hidden_state=hidden), {"labels": [head.vocab.encode(t) for t in texts]})
    assert from_text.loss.item() == pytest.approx(from_labels.loss.item()) == pytest.approx(as_lists.loss.item())
    no_labels = head(EncoderOutput(last_hidden_state=hidden), {})
    assert no_labels.loss is None and no_labels.logits.shape == (2, 30, 32)
    with pytest.raises(ValueError):
        head(EncoderOutput(last_hidden_state=hidden), {"labels": torch.tensor([[32]])})


def test_zero_infinity_and_bf16():
    head = CTCHead(input_dim=4, final_dropout=0.0)
    hidden = torch.randn(1, 3, 4)
    too_long = {"text": ["ABCDEFG"]}
    assert torch.isinf(head(EncoderOutput(last_hidden_state=hidden), too_long).loss)
    head.ctc_zero_infinity = True
    assert head(EncoderOutput(last_hidden_state=hidden), too_long).loss.item() == 0.0
    head = CTCHead(input_dim=4, final_dropout=0.0).to(torch.bfloat16)
    out = head(EncoderOutput(last_hidden_state=torch.randn(1, 10, 4, dtype=torch.bfloat16)), {"text": ["AB"]})
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def _tiny_hf_ctc(reduction: str, zero_infinity: bool = False):
    from transformers import Data2VecAudioConfig, Data2VecAudioForCTC

    config = Data2VecAudioConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=1,
        conv_pos_kernel_size=3, num_conv_pos_embedding_groups=2, vocab_size=32, mask_time_prob=0.0,
        layerdrop=0.0, final_dropout=0.1, ctc_loss_reduction=reduction, ctc_zero_infinity=zero_infinity,
    )
    torch.manual_seed(0)
    return Data2VecAudioForCTC(config).eval()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_hf_data2vec_audio_for_ctc(reduction):
    hf = _tiny_hf_ctc(reduction)
    head = CTCHead(input_dim=16, final_dropout=hf.config.final_dropout, ctc_loss_reduction=reduction).eval()
    head.proj.load_state_dict(hf.lm_head.state_dict())

    torch.manual_seed(1)
    waves = torch.randn(3, 400)
    attention = torch.ones(3, 400, dtype=torch.long)
    attention[1, 300:] = 0
    attention[2, 170:] = 0
    labels = head.encode_texts(["HELLO WORLD", "A CAT", "HI"])

    hf_out = hf(waves, attention_mask=attention, labels=labels)
    with torch.no_grad():
        hidden = hf.data2vec_audio(waves, attention_mask=attention).last_hidden_state
        frame_mask = hf._get_feature_vector_attention_mask(hidden.shape[1], attention)
    ours = head(EncoderOutput(last_hidden_state=hidden, padding_mask=~frame_mask), {"labels": labels})

    torch.testing.assert_close(ours.logits, hf_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, hf_out.loss, atol=1e-5, rtol=1e-5)
    assert ours.extras["output_lengths"].tolist() == hf._get_feat_extract_output_lengths(attention.sum(-1)).tolist()

    # same gradients on the projection
    hf_out.loss.backward()
    ours.loss.backward()
    torch.testing.assert_close(head.proj.weight.grad, hf.lm_head.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.proj.bias.grad, hf.lm_head.bias.grad, atol=1e-5, rtol=1e-4)

    # text batches give the same loss as the HF labels
    from_text = head(EncoderOutput(last_hidden_state=hidden, padding_mask=~frame_mask),
                     {"text": ["hello world", "a cat", "hi"]})
    torch.testing.assert_close(from_text.loss, hf_out.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_matches_hf_zero_infinity(zero_infinity):
    hf = _tiny_hf_ctc("sum", zero_infinity)
    head = CTCHead(input_dim=16, ctc_zero_infinity=zero_infinity).eval()
    head.proj.load_state_dict(hf.lm_head.state_dict())
    waves = torch.randn(2, 400)
    attention = torch.ones(2, 400, dtype=torch.long)
    attention[1, 100:] = 0  # 9 frames: too short for the second transcript
    labels = head.encode_texts(["HI", "A VERY LONG TRANSCRIPT"])
    hf_out = hf(waves, attention_mask=attention, labels=labels)
    with torch.no_grad():
        hidden = hf.data2vec_audio(waves, attention_mask=attention).last_hidden_state
        frame_mask = hf._get_feature_vector_attention_mask(hidden.shape[1], attention)
    ours = head(EncoderOutput(last_hidden_state=hidden, padding_mask=~frame_mask), {"labels": labels})
    assert torch.isinf(hf_out.loss).item() == torch.isinf(ours.loss).item() == (not zero_infinity)
    if zero_infinity:
        torch.testing.assert_close(ours.loss, hf_out.loss, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- decoding
@pytest.mark.parametrize(
    "path, text",
    [
        ("HH|EE_LL_LO", "H ELLO"),
        ("HHEE_LL_LLOO||WWOO_RRLD", "HELLO WORLD"),
        ("__A__", "A"),
        ("____", ""),
        ("", ""),
        ("||A||", "A"),
        ("A|_|B", "A B"),
        ("AAAA", "A"),
        ("A_A_A", "AAA"),
        ("IT''S", "IT'S"),
        ("I_T'_'S", "IT''S"),
    ],
)
def test_greedy_decoding_of_hand_made_alignments(path, text):
    head = CTCHead(input_dim=4)
    logits = path_logits(head.vocab, path)[None]
    assert head.predict(head_output(logits), {}) == [text]
    head.decoder = "beam"
    assert head.predict(head_output(logits), {}) == [text]


def test_predict_respects_padding():
    head = CTCHead(input_dim=4)
    first = path_logits(head.vocab, "HH_I__||TTHERE")
    second = path_logits(head.vocab, "YO_OUZZZQQQQQQ")  # only the first 5 frames are real
    logits = torch.stack([first, second])
    for decoder in ["greedy", "beam"]:
        head.decoder = decoder
        assert head.predict(head_output(logits, [14, 5]), {}) == ["HI THERE", "YOOU"]
        assert head.predict(head_output(logits), {}) == ["HI THERE", "YOOUZQ"]
    # lengths come from the encoder's padding mask through forward()
    padding = torch.zeros(2, 14, dtype=torch.bool)
    padding[1, 5:] = True
    out = head(EncoderOutput(last_hidden_state=torch.zeros(2, 14, 4), padding_mask=padding), {})
    assert out.extras["output_lengths"].tolist() == [14, 5]
    assert head.predict(HeadOutput(logits=logits, extras=out.extras), {}) == ["HI THERE", "YOOU"]
    assert ctc_greedy_ids(logits, torch.tensor([14, 0]))[1] == []


def test_beam_search_beats_greedy_where_greedy_is_wrong():
    head = CTCHead(input_dim=4)
    a = head.vocab.token_to_id["A"]
    probs = torch.full((2, 32), 1e-9)
    probs[:, 0] = 0.6
    probs[:, a] = 0.4
    logits = probs.log()[None]
    assert head.predict(head_output(logits), {}) == [""]  # best path: blank, blank (0.36)
    head.decoder = "beam"
    assert head.predict(head_output(logits), {}) == ["A"]  # best labelling: "A" (0.64)
    ids, logp = ctc_prefix_beam_search(torch.log_softmax(logits[0], -1), beam_size=8)
    assert ids == [a] and logp == pytest.approx(math.log(0.64), abs=1e-6)
    nll_beam, _ = head.ctc_loss(logits, torch.tensor([[a]]), torch.tensor([2]))
    nll_greedy, _ = head.ctc_loss(logits, torch.tensor([[-100]]), torch.tensor([2]))
    assert nll_beam < nll_greedy


def test_beam_search_longer_crafted_case():
    # "AB" beats the best path "A" once the mass of all alignments is summed
    vocab = CharVocab(TINY)
    rows = [
        [0.1, 0.5, 0.4],
        [0.5, 0.1, 0.4],
        [0.5, 0.1, 0.4],
    ]
    log_probs = torch.tensor(rows).log()
    greedy = ctc_greedy_ids(log_probs[None])[0]
    beam, beam_logp = ctc_prefix_beam_search(log_probs, beam_size=4)
    greedy_nll = brute_force_nll(log_probs, greedy, 0)
    beam_nll = brute_force_nll(log_probs, beam, 0)
    assert beam_logp == pytest.approx(-beam_nll, abs=1e-6)
    assert beam_nll <= greedy_nll
    assert vocab.decode(greedy) == "A" and vocab.decode(beam) != "A"


# --------------------------------------------------------------------------- evaluation
def test_eval_counts_summarize_references():
    head = CTCHead(input_dim=4)
    batch = {"text": ["  hello   world", "it's ok"]}
    logits = torch.stack([path_logits(head.vocab, "HELLO_|WORD___"), path_logits(head.vocab, "IT'S|OK_______")])
    out = head_output(logits)
    assert head.references(batch) == ["HELLO WORLD", "IT'S OK"]
    assert head.predict(out, batch) == ["HELO WORD", "IT'S OK"]
    counts = head.eval_counts(out, batch)
    assert counts == {"word_errors": 2.0, "words": 4.0, "char_errors": 2.0, "chars": 18.0, "utterances": 2.0}
    metrics = head.summarize({k: 2 * v for k, v in counts.items()})  # counts are additive
    assert metrics == {"wer": pytest.approx(50.0), "cer": pytest.approx(100 * 2 / 18)}
    # references from labels when there is no text
    labels = head.encode_texts(["hello world", "it's ok"])
    assert head.references({"labels": labels}) == ["HELLO WORLD", "IT'S OK"]
    # with labels, the loss is counted too
    enc = EncoderOutput(last_hidden_state=torch.randn(2, 14, 4))
    with_loss = head(enc, batch)
    counts = head.eval_counts(with_loss, batch)
    assert counts["loss_sum"] == pytest.approx(with_loss.loss.item(), rel=1e-6)
    assert head.summarize(counts)["ctc_loss"] == pytest.approx(with_loss.loss.item() / 2, rel=1e-6)
    assert head.summarize({}) == {"wer": 0.0, "cer": 0.0}
