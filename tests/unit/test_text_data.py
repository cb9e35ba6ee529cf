"""Text data: tokenizers (parity with transformers' RobertaTokenizer), sentencepiece training and
the ``d2v tokenizer train`` command, the text datasets, the shipped demo corpora, the processor."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v.api.errors import SpecError
from d2v.ssl.masking import BertMask
from d2v_text.datasets import CONLL2003_NER, CoNLL, GlueTSV, SquadJSON, SwagCSV, TextLines
from d2v_text.processor import TextProcessor
from d2v_text.tokenizer import load_tokenizer, train_sentencepiece

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "data" / "text_demo"
VOCAB = DEMO / "tokenizer"

VARIED = [
    "Hello world",
    "Hello  world   with    runs of spaces",
    " leading space and trailing space ",
    "tabs\tand\nnewlines\n\nand\r\nwindows line ends",
    "Accents: café, naïve, Zoë, São Paulo, Ångström, façade",
    "CJK: 東京は日本の首都です。中文字符，한국어 텍스트",
    "Emoji: 🙂 👍🏽 👨‍👩‍👧 🇫🇷 and ✨sparkles✨",
    "Mixed: Laura Weber was born in Osaka in 1955. Ünïcödé!!! ???",
    "punctuation... (brackets) [more] {braces} 'quotes' \"double\" — dashes – and so-on",
    "digits 1234567890 3.14159 1,000,000 and $5 or 10%",
    "a\u00a0non-breaking\u2009thin\u200bzero-width space",
    "",
    "    ",
    "x",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def hf_tokenizers():
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken

    # RoBERTa's own tokenizer strips the space before <mask> (lstrip); loading bare vocab files
    # in transformers 5 does not, so say it explicitly to compare like with like
    mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
    out = {}
    for name in ("RobertaTokenizer", "RobertaTokenizerFast"):
        cls = getattr(transformers, name)
        out[name] = (cls.from_pretrained(str(VOCAB), mask_token=mask),
                     cls.from_pretrained(str(VOCAB), mask_token=mask, add_prefix_space=True))
    return out


# ------------------------------------------------------------------ tokenizer parity
@pytest.mark.parametrize("name", ["RobertaTokenizer", "RobertaTokenizerFast"])
def test_tokenizer_matches_roberta_on_varied_text(tok, hf_tokenizers, name):
    hf, _ = hf_tokenizers[name]
    for text in VARIED + ["Fill the <mask> here", "two<mask>masks <mask>."]:
        mine = tok.encode(text)
        ref = hf(text, return_offsets_mapping=True)
        assert mine.ids == ref["input_ids"], text
        assert mine.offsets == [tuple(o) for o in ref["offset_mapping"]], text
        assert mine.word_ids == ref.word_ids(), text
        assert tok.decode(mine.ids) == hf.decode(ref["input_ids"], skip_special_tokens=True), text
        assert tok.decode(mine.ids, skip_special_tokens=False) == hf.decode(ref["input_ids"]), text


@pytest.mark.parametrize("name", ["RobertaTokenizer", "RobertaTokenizerFast"])
def test_tokenizer_matches_roberta_on_pairs(tok, hf_tokenizers, name):
    hf, _ = hf_tokenizers[name]
    for a, b in zip(VARIED, reversed(VARIED)):
        mine = tok.encode(a, b)
        ref = hf(a, b, return_offsets_mapping=True)
        assert mine.ids == ref["input_ids"], (a, b)
        assert mine.offsets == [tuple(o) for o in ref["offset_mapping"]], (a, b)
        assert mine.sequence_ids == ref.sequence_ids(), (a, b)
    enc = tok.encode("a b", "c")
    eos = tok.eos_token_id
    assert enc.ids[0] == tok.bos_token_id and enc.ids[-1] == eos
    assert enc.ids[enc.sequence_ids.index(1) - 2: enc.sequence_ids.index(1)] == [eos, eos]  # <s> A </s></s> B </s>


@pytest.mark.parametrize("name", ["RobertaTokenizer", "RobertaTokenizerFast"])
def test_tokenizer_matches_roberta_on_presplit_words(tok, hf_tokenizers, name):
    _, hf_words = hf_tokenizers[name]
    sentences = [
        ["Laura", "Weber", "was", "born", "in", "Osaka", "."],
        ["café", "東京", "🙂", "naïve", "Zenith", "Group"],
        ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
        ["x"],
    ]
    for words in sentences:
        mine = tok.encode_words(words)
        ref = hf_words(words, is_split_into_words=True, return_offsets_mapping=True)
        assert mine.ids == ref["input_ids"], words
        assert mine.offsets == [tuple(o) for o in ref["offset_mapping"]], words
        assert mine.word_ids == ref.word_ids(), words


def test_special_tokens_are_robertas(tok):
    vocab = json.loads((VOCAB / "vocab.json").read_text())
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == len(vocab) - 1 == tok.vocab_size - 1
    assert 1000 <= tok.vocab_size <= 2000
    # <mask> absorbs the space before it (RoBERTa's lstrip), so fill-mask text has no stray space token
    assert tok.encode("The sky is <mask>.").ids == tok.encode("The sky is<mask>.").ids


def test_tokenizer_json_roundtrip_and_pickle(tok, tmp_path):
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path / "tokenizer.json")
    restored = pickle.loads(pickle.dumps(tok))
    for text in VARIED:
        assert again.encode(text).ids == tok.encode(text).ids == restored.encode(text).ids
        assert again.encode(text).offsets == tok.encode(text).offsets
    assert load_tokenizer(tmp_path).vocab_size == tok.vocab_size  # the directory holds tokenizer.json
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "vocab.json", "merges.txt"}


def test_saved_tokenizer_loads_in_transformers(tok, hf_tokenizers, tmp_path):
    from transformers import RobertaTokenizerFast

    tok.save(tmp_path)
    hf = RobertaTokenizerFast.from_pretrained(str(tmp_path))
    for text in VARIED + ["The sky is <mask>."]:
        assert hf(text)["input_ids"] == tok.encode(text).ids, text


def test_load_tokenizer_errors_say_what_is_expected(tmp_path):
    with pytest.raises(SpecError, match="does not exist; expected a directory with vocab.json"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(SpecError, match="holds no tokenizer files .*readme.md"):
        load_tokenizer(tmp_path)
    vocab = {"a": 0, "b": 1}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(SpecError, match="no <s>, <pad>, </s>, <unk>, <mask>"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------ sentencepiece
@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("spm") / "tok"
    return train_sentencepiece([DEMO / "lm" / "valid.txt", DEMO / "SST-2" / "dev.tsv"], vocab_size=400, out=out,
                               model_type="unigram")


def test_sentencepiece_training_has_roberta_specials(spm_dir):
    sp = load_tokenizer(spm_dir)
    assert sp.backend.kind == "sentencepiece"
    assert (sp.bos_token_id, sp.pad_token_id, sp.eos_token_id, sp.unk_token_id, sp.mask_token_id) == (0, 1, 2, 3, 4)
    assert sp.vocab_size == 400
    for text in ["After Monday comes Tuesday.", "café 東京 🙂 unseen wørds", "the  cat\tsat"]:
        enc = sp.encode(text)
        assert enc.ids[0] == 0 and enc.ids[-1] == 2 and 3 not in enc.ids  # byte fallback: no <unk>
        assert sp.decode(enc.ids) == " ".join(text.split())  # sentencepiece normalises whitespace runs
        for (start, end), seq in zip(enc.offsets, enc.sequence_ids):
            assert seq is None or 0 <= start <= end <= len(text)
    pair = sp.encode("a b", "c d")
    assert pair.ids.count(2) == 3 and pair.sequence_ids.count(1) > 0
    assert sp.encode("the <mask> tastes sour").ids.count(4) == 1
    words = sp.encode_words(["The", "lemon", "tastes", "sour"])
    assert sorted({w for w in words.word_ids if w is not None}) == [0, 1, 2, 3]
    restored = pickle.loads(pickle.dumps(sp))
    assert restored.encode("The lemon tastes sour.").ids == sp.encode("The lemon tastes sour.").ids


def test_cli_tokenizer_train(tmp_path, capsys):
    from d2v.cli.main import main

    out = tmp_path / "spm"
    args = ["tokenizer", "train", str(DEMO / "lm" / "valid.txt"), "--vocab-size", "350", "--out", str(out)]
    assert main(args) == 0
    assert "<mask>=4" in capsys.readouterr().out
    assert load_tokenizer(out).vocab_size == 350
    assert main(args) == 2  # refuses to overwrite
    assert "pass --force" in capsys.readouterr().err
    assert main(args + ["--force", "--model-type", "bpe"]) == 0
    assert main(["tokenizer", "train", str(tmp_path / "missing.txt"), "--vocab-size", "350", "--out",
                 str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_processor_trains_its_tokenizer_once(tmp_path, caplog):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((DEMO / "lm" / "valid.txt").read_text())
    spec = {"corpus": str(corpus), "vocab_size": 320, "out": str(tmp_path / "tok")}
    with caplog.at_level(logging.WARNING, logger="d2v_text"):
        first = TextProcessor(train_tokenizer=spec, max_length=32)
    assert "training a 320-token sentencepiece vocabulary" in caplog.text
    stamp = (tmp_path / "tok" / "spm.model").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="d2v_text"):
        second = TextProcessor(train_tokenizer=spec, max_length=32)
    assert "training" not in caplog.text and (tmp_path / "tok" / "spm.model").stat().st_mtime_ns == stamp
    assert first.vocab_size == second.vocab_size == 320
    with corpus.open("a") as f:
        f.write("A new line changes the corpus.\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="d2v_text"):
        TextProcessor(train_tokenizer=spec, max_length=32)
    assert "training a 320-token" in caplog.text
    with pytest.raises(SpecError, match="exactly one of tokenizer"):
        TextProcessor(tokenizer=str(VOCAB), train_tokenizer=spec)
    with pytest.raises(SpecError, match="needs corpus and vocab_size"):
        TextProcessor(train_tokenizer={"corpus": "x"})


# ------------------------------------------------------------------ datasets
def test_demo_corpora_are_small_and_complete():
    expected = ["lm/train.txt", "lm/valid.txt", "SST-2/train.tsv", "SST-2/dev.tsv", "conll/train.txt",
                "conll/valid.txt", "conll/test.txt", "squad/train-v1.1.json", "squad/dev-v1.1.json",
                "swag/train.csv", "swag/val.csv", "tokenizer/vocab.json", "tokenizer/merges.txt"]
    for rel in expected:
        assert (DEMO / rel).is_file(), rel
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 2_000_000
    assert len(TextLines(str(DEMO / "lm" / "train.txt"))) == 3000
    sst = GlueTSV(str(DEMO), "SST-2", "train")
    assert len(sst) == 2000 and 0.4 < np.mean([ex["label"] for ex in sst]) < 0.6
    ner = CoNLL(str(DEMO / "conll" / "train.txt"))
    assert len(ner) == 1000 and {t for ex in ner for t in ex["word_labels"]} == {"O", "B-PER", "I-PER", "B-LOC", "B-ORG", "I-ORG"}
    squad = SquadJSON(str(DEMO / "squad" / "dev-v1.1.json"))
    assert len(squad) == 240 and squad.version == "1.1"
    swag = SwagCSV(str(DEMO / "swag" / "val.csv"))
    assert len(swag) == 200 and all(len(ex["choices"]) == 4 for ex in swag)


def test_demo_corpora_regenerate_identically(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO / "plugins") + os.pathsep + str(REPO / "core")}
    subprocess.run([sys.executable, str(REPO / "experiments" / "data" / "make_text_demo.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, env=env)
    for path in sorted(DEMO.rglob("*")):
        if path.is_file():
            assert (tmp_path / path.relative_to(DEMO)).read_bytes() == path.read_bytes(), path


def test_text_lines_documents_and_paragraphs(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("first doc line\n\n  second doc  \nthird\n\n\nfourth\n")
    lines = TextLines(str(f))
    assert [ex["text"] for ex in lines] == ["first doc line", "second doc", "third", "fourth"]
    paras = TextLines(str(f), paragraphs=True)
    assert [ex["text"] for ex in paras] == ["first doc line", "second doc third", "fourth"]
    assert all(ex["task"] == "text" for ex in paras) and len(paras.lengths) == 3
    assert len(TextLines(str(tmp_path), max_examples=2)) == 2  # a directory of *.txt
    with pytest.raises(SpecError, match="not found"):
        TextLines(str(tmp_path / "missing.txt"))


GLUE_FILES = {
    "CoLA/train.tsv": "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n",
    "CoLA/test.tsv": "index\tsentence\n0\tBill whistled past the house.\n",
    "SST-2/dev.tsv": "sentence\tlabel\nit 's a charming journey .\t1\nunflinchingly bleak .\t0\n",
    "MRPC/train.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t702876\t702977\tAmrozi accused.\tReferring to him.\n",
    "STS-B/dev.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                     "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat.\tA man wearing a hat.\t5.000\n",
    "QQP/train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n133273\t213221\t213222\tHow is it?\tWhat is it?\t0\n",
    "MNLI/dev_matched.tsv": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                            "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
                            "0\t63735\t63735n\tslate\t(\t(\t(\t(\tThe new rights are nice.\tEveryone likes it.\tneutral\tneutral\n",
    "MNLI/test_mismatched.tsv": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                                "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\n"
                                "0\t1\t1n\tx\t(\t(\t(\t(\tA text.\tAnother.\n",
    "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWhat came first?\tThe egg.\tnot_entailment\n",
    "RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tNo weapons found.\tWeapons found.\tnot_entailment\n",
    "WNLI/train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin.\tI stuck a pin.\t1\n",
}


@pytest.fixture
def glue_root(tmp_path):
    for rel, text in GLUE_FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    return tmp_path


def test_glue_tsv_reads_every_task_layout(glue_root):
    cola = GlueTSV(str(glue_root), "cola", "train")
    assert [(ex["text"], ex["label"]) for ex in cola] == [("Our friends won't buy this analysis.", 1), ("They drank the pub.", 0)]
    assert cola.label_names == ["unacceptable", "acceptable"]
    assert [ex["label"] for ex in GlueTSV(str(glue_root), "cola", "test")] == [None]
    assert GlueTSV(str(glue_root), "sst2", "dev")[0]["label"] == 1
    mrpc = GlueTSV(str(glue_root), "MRPC", "train")[0]
    assert (mrpc["text"], mrpc["text_pair"], mrpc["label"]) == ("Amrozi accused.", "Referring to him.", 1)
    stsb = GlueTSV(str(glue_root), "STS-B", "dev")
    assert stsb[0]["label"] == 5.0 and isinstance(stsb[0]["label"], float) and stsb.is_regression
    assert GlueTSV(str(glue_root), "qqp", "train")[0]["text_pair"] == "What is it?"
    mnli = GlueTSV(str(glue_root), "mnli", "dev_matched")
    assert mnli[0]["label"] == 1 and mnli.label_names == ["entailment", "neutral", "contradiction"]
    assert GlueTSV(str(glue_root), "mnli", "test_mismatched")[0]["label"] is None
    assert GlueTSV(str(glue_root), "qnli", "dev")[0]["label"] == 1
    assert GlueTSV(str(glue_root), "rte", "train")[0]["text_pair"] == "Weapons found."
    assert GlueTSV(str(glue_root), "wnli", "train")[0]["label"] == 1


def test_glue_missing_data_says_where_it_looked(glue_root):
    with pytest.raises(SpecError, match=r"RTE/dev.tsv' not found \(splits present: train\).*gluebenchmark.com"):
        GlueTSV(str(glue_root), "rte", "dev")
    with pytest.raises(SpecError, match=r"CoLA.*does not exist.*gluebenchmark"):
        GlueTSV(str(glue_root / "elsewhere"), "cola", "train")
    with pytest.raises(SpecError, match="unknown task 'sst5'"):
        GlueTSV(str(glue_root), "sst5", "train")
    (glue_root / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(SpecError, match="line 2 .* label 'maybe'"):
        GlueTSV(str(glue_root), "rte", "dev")


def test_squad_v2_and_errors(tmp_path):
    data = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "a", "question": "Where is Paris?", "is_impossible": False,
         "answers": [{"text": "France", "answer_start": 12}, {"text": "in France", "answer_start": 9}]},
        {"id": "b", "question": "Where is Rome?", "is_impossible": True, "answers": [],
         "plausible_answers": [{"text": "France", "answer_start": 12}]}]}]}]}
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(data))
    squad = SquadJSON(str(path))
    assert [ex["is_impossible"] for ex in squad] == [False, True]
    assert [a["text"] for a in squad[0]["answers"]] == ["France", "in France"] and squad[1]["answers"] == []
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError, match="answer 'France' is not at character 3"):
        SquadJSON(str(path))
    with pytest.raises(SpecError, match="not found.*rajpurkar"):
        SquadJSON(str(tmp_path / "train-v1.1.json"))


def test_conll_sentences_docstart_and_tags(tmp_path):
    path = tmp_path / "eng.train"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n"
                    "\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n\n-DOCSTART- -X- -X- O\nx NN B-NP O\n")
    ner = CoNLL(str(path))
    assert [ex["words"] for ex in ner] == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["x"]]
    assert ner[0]["word_label_ids"] == [CONLL2003_NER.index(t) for t in ("B-ORG", "O", "B-MISC")]
    pos = CoNLL(str(path), tag_column=1, labels=["NNP", "VBZ", "JJ", "NN"])
    assert pos[0]["word_labels"] == ["NNP", "VBZ", "JJ"]
    path.write_text("Peter NNP B-NP B-PERSON\n")
    with pytest.raises(SpecError, match="line 1 .* tag 'B-PERSON'"):
        CoNLL(str(path))


def test_swag_csv_choices(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text(",video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label\n"
                    '0,v,5,"A, b",She opens the door.,She,gold,"walks in, smiling.",sits.,runs.,flies.,0\n')
    swag = SwagCSV(str(path))
    assert swag[0]["choices"][0] == "She walks in, smiling." and swag[0]["label"] == 0 and swag[0]["text"] == "She opens the door."
    with pytest.raises(SpecError, match="not found.*rowanz/swagaf"):
        SwagCSV(str(tmp_path / "train.csv"))


# ------------------------------------------------------------------ processor
@pytest.fixture(scope="module")
def proc():
    return TextProcessor(tokenizer=str(VOCAB), max_length=64, stride=16)


def test_processor_classification_batches(proc, glue_root):
    stsb = GlueTSV(str(glue_root), "stsb", "dev")
    batch = proc.collate([proc.load(stsb[0], train=True)])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [5.0]
    sst = GlueTSV(str(DEMO), "sst2", "dev")
    examples = [proc.load(sst[i], train=False) for i in range(5)]
    batch = proc.collate(examples)
    assert batch["labels"].dtype == torch.long and batch["inputs"].shape[0] == 5
    assert torch.equal(batch["padding_mask"], batch["inputs"] == proc.pad_token_id)
    for row, ex in zip(batch["inputs"], list(sst)[:5]):
        assert row[~(row == 1)].tolist() == proc.tokenizer.encode(ex["text"]).ids
    test = proc.collate([proc.load(ex, train=False) for ex in GlueTSV(str(glue_root), "cola", "test")])
    assert "labels" not in test
    multi = proc.collate([proc.load({"id": "m", "text": "a", "label": [1.0, 0.0, 1.0]}, train=True)])
    assert multi["labels"].shape == (1, 3) and multi["labels"].dtype == torch.float32
    assert proc.vocab_size == 1500


def test_processor_truncates_pairs_longest_first_and_reports(caplog):
    p = TextProcessor(tokenizer=str(VOCAB), max_length=16)
    ex = {"id": "x", "task": "classification", "text": "After Monday comes Tuesday. " * 5, "text_pair": "short one", "label": 1}
    with caplog.at_level(logging.WARNING, logger="d2v_text"):
        row = p.load(ex, train=True)["rows"][0]["input_ids"]
        p.load(ex, train=True)
        p.load(ex, train=True)
    tail = [2] + p.tokenizer.pieces("short one").ids + [2]
    assert len(row) == 16 and row.tolist()[-len(tail):] == tail
    assert p.truncated_examples == 3 and p.truncated_tokens > 0
    reports = [r.getMessage() for r in caplog.records if "truncated so far" in r.getMessage()]
    assert len(reports) == 2 and reports[0].startswith("text processor: 1 example(s)") and "2 example(s)" in reports[1]


def test_processor_token_classification_aligns_first_subtoken(proc):
    ner = CoNLL(str(DEMO / "conll" / "valid.txt"))
    examples = [proc.load(ner[i], train=True) for i in range(8)]
    batch = proc.collate(examples)
    for r, ex in enumerate(ner.examples[:8]):
        word_ids = batch["word_ids"][r]
        labels = batch["labels"][r]
        firsts = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
        assert [int(labels[i]) for i in firsts] == ex["word_label_ids"]
        assert int((labels != -100).sum()) == len(ex["words"])
    assert batch["words"][0] == ner[0]["words"] and batch["word_labels"][0] == ner[0]["word_labels"]


def test_processor_question_answering_windows_match_transformers(hf_tokenizers):
    hf, _ = hf_tokenizers["RobertaTokenizerFast"]
    squad = SquadJSON(str(DEMO / "squad" / "dev-v1.1.json"))
    p = TextProcessor(tokenizer=str(VOCAB), max_length=36, stride=6)
    for ex in squad.examples[:30]:
        rows = p.load(ex, train=True)["rows"]
        ref = hf(ex["question"], ex["context"], truncation="only_second", max_length=36, stride=6,
                 return_overflowing_tokens=True, return_offsets_mapping=True)
        assert [r["input_ids"].tolist() for r in rows] == ref["input_ids"]
        for k, row in enumerate(rows):
            expected = [tuple(o) if s == 1 else None for o, s in zip(ref["offset_mapping"][k], ref.sequence_ids(k))]
            assert row["offsets"] == expected
        found = [r for r in rows if r["start"] > 0]
        assert found, "the short demo answers fit in at least one window"
        for r in found:
            start = r["offsets"][r["start"]][0]
            end = r["offsets"][r["end"]][1]
            assert ex["context"][start:end] == ex["answers"][0]["text"]


def test_processor_question_answering_batch(proc):
    squad = SquadJSON(str(DEMO / "squad" / "dev-v1.1.json"))
    p = TextProcessor(tokenizer=str(VOCAB), max_length=40, stride=8)
    batch = p.collate([p.load(squad[i], train=False) for i in range(3)])
    rows = batch["inputs"].shape[0]
    assert rows > 3 and len(batch["example_ids"]) == len(batch["offsets"]) == len(batch["contexts"]) == rows
    assert batch["ids"] == [squad[i]["id"] for i in range(3)]
    assert batch["example_ids"] == sorted(batch["example_ids"])  # all windows of an example together
    assert batch["answers"][0] == [squad[0]["answers"][0]["text"]]
    impossible = {"id": "q", "question": "Why?", "context": "No reason.", "answers": [], "is_impossible": True}
    b = p.collate([p.load(impossible, train=True)])
    assert b["start_positions"].tolist() == [0] and b["end_positions"].tolist() == [0] and b["answers"] == [[]]
    with pytest.raises(SpecError, match="not more than stride"):
        TextProcessor(tokenizer=str(VOCAB), max_length=16, stride=12).load(squad[0], train=True)


def test_processor_multiple_choice(proc):
    swag = SwagCSV(str(DEMO / "swag" / "val.csv"))
    batch = proc.collate([proc.load(swag[i], train=True) for i in range(3)])
    B, C, S = batch["inputs"].shape
    assert (B, C) == (3, 4) and batch["padding_mask"].shape == (B, C, S)
    assert batch["labels"].tolist() == [swag[i]["label"] for i in range(3)]
    ex = swag[0]
    row = batch["inputs"][0, 2]
    assert row[~batch["padding_mask"][0, 2]].tolist() == proc.tokenizer.encode(ex["text"], ex["choices"][2]).ids


def test_processor_splits_long_text_into_blocks(proc):
    text = " ".join(f"After {d} comes the next day." for d in ["Monday", "Tuesday", "Friday"] * 10)
    loaded = proc.load({"id": "doc", "text": text}, train=True)
    pieces = proc.tokenizer.pieces(text).ids
    blocks = [r["input_ids"].tolist() for r in loaded["rows"]]
    assert len(blocks) == -(-len(pieces) // 62) and all(len(b) <= 64 for b in blocks)
    assert [i for b in blocks for i in b[1:-1]] == pieces  # nothing lost
    batch = proc.collate([loaded])
    assert batch["ids"][:2] == ["doc", "doc#1"]
    assert torch.equal(batch["labels"], batch["inputs"].masked_fill(batch["padding_mask"], -100))
    truncating = TextProcessor(tokenizer=str(VOCAB), max_length=64, long_text="truncate")
    assert len(truncating.load({"id": "doc", "text": text}, train=True)["rows"]) == 1
    assert truncating.truncated_tokens == len(pieces) - 62


def test_processor_bert_masking_batch():
    p = TextProcessor(tokenizer=str(VOCAB), max_length=64, masking=BertMask(mask_prob=0.15))
    lines = TextLines(str(DEMO / "lm" / "valid.txt"))
    examples = [p.load(lines[i], train=True, rng=np.random.default_rng([1, 0, i])) for i in range(16)]
    batch = p.collate(examples)
    sel, teacher = batch["corrupted_mask"], batch["teacher_inputs"]
    special = torch.isin(teacher, torch.tensor(p.tokenizer.all_special_ids))
    assert not (sel & special).any() and not (sel & batch["padding_mask"]).any()
    assert torch.equal(batch["labels"][sel], teacher[sel]) and (batch["labels"][~sel] == -100).all()
    assert torch.equal(batch["inputs"][~sel], teacher[~sel])
    assert batch["mask_token_id"] == p.mask_token_id == 1499
    n_valid = (~special & ~batch["padding_mask"]).sum(1)
    assert sel.sum(1).tolist() == torch.clamp(torch.floor(0.15 * n_valid + 0.5), min=1).long().tolist()
    again = p.collate([p.load(lines[i], train=True, rng=np.random.default_rng([1, 0, i])) for i in range(16)])
    assert torch.equal(again["inputs"], batch["inputs"])  # seeded by the loader's per-example generator
    no_rng = [p.load(lines[0], train=True)["rows"][0]["input_ids"].tolist() for _ in range(2)]
    assert no_rng[0] == no_rng[1]
    with pytest.raises(SpecError, match="masking applies to plain text"):
        p.load({"id": "x", "text": "a", "label": 1}, train=True)
    from d2v.ssl.masking import RandomMask

    with pytest.raises(SpecError, match="masking must be the token-level"):
        TextProcessor(tokenizer=str(VOCAB), masking=RandomMask())


def test_pad_batch_pads_the_per_token_tensors_only(proc):
    """Fixed-shape inference pads batches to a bucket length: every per-token tensor gets its own
    padding value, while per-example targets stay as they are, even a multi-label target
    whose width equals the batch's length."""
    from d2v.use.static_shapes import padded_to_bucket

    masked = TextProcessor(tokenizer=str(VOCAB), max_length=64, masking=BertMask(mask_prob=0.3))
    lm = masked.collate([masked.load({"id": "a", "text": "After Monday comes Tuesday."}, train=True,
                                     rng=np.random.default_rng(0))])
    length = lm["inputs"].shape[1]
    multi = proc.collate([proc.load({"id": "m", "text": "After Monday comes Tuesday.", "label": [1.0] * length},
                                    train=True)])
    assert multi["labels"].shape == multi["inputs"].shape  # the coincidence a shape rule would get wrong
    ner = proc.collate([proc.load(CoNLL(str(DEMO / "conll" / "valid.txt"))[0], train=True)])
    choices = proc.collate([proc.load(SwagCSV(str(DEMO / "swag" / "val.csv"))[0], train=True)])
    fills = {"inputs": proc.pad_token_id, "padding_mask": True, "teacher_inputs": proc.pad_token_id,
             "corrupted_mask": False}
    for batch, token_labels in ((lm, True), (multi, False), (ner, True), (choices, False)):
        padded = padded_to_bucket(batch, proc, 32)
        tokens = batch["inputs"].shape[-1]
        assert padded["inputs"].shape[-1] == 32 * -(-tokens // 32) > tokens
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                assert padded[key] is value
                continue
            grows = key in fills or (key == "labels" and token_labels)
            if not grows:
                assert torch.equal(padded[key], value), key
                continue
            assert torch.equal(padded[key][..., :tokens], value), key
            fill = -100 if key == "labels" else fills[key]
            assert (padded[key][..., tokens:] == fill).all(), key


def test_processor_from_spec_and_bucketed_loader():
    from d2v.api import plugins
    from d2v.spec.config import LoaderConfig
    from d2v.data.loading import make_loader
    from d2v.spec.model import build_component

    registry = plugins.registry()
    proc = build_component(registry, "processor", {"name": "text", "tokenizer": str(VOCAB), "max_length": 48,
                                                   "masking": {"name": "bert", "mask_prob": 0.2}}, "data.processor")
    assert isinstance(proc.masking, BertMask) and proc.masking.mask_prob == 0.2
    data = build_component(registry, "dataset", {"name": "text_lines", "path": str(DEMO / "lm" / "valid.txt")}, "data.train")
    loader = make_loader(data, proc, LoaderConfig(max_batch_length=1024), train=True, seed=1, where="data.train")
    seen = []
    for batch in loader:
        assert batch["inputs"].numel() <= 1024 * 2 and "corrupted_mask" in batch
        seen += [i for i in batch["ids"] if "#" not in i]  # long documents come as several blocks
    assert sorted(seen) == sorted(ex["id"] for ex in data)


def test_spec_validation_catches_processor_typos(tmp_path):
    from d2v.spec.config import load_spec, validate

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "task: finetune\nmodel: {preset: data2vec-audio-tiny, head: {name: ctc}}\n"
        "data:\n  processor: {name: text, tokenizer: x, max_lenght: 3, masking: {name: bert, mask_prob: 0.2}}\n"
        "  train: {name: text_lines, path: x}\noptim: {name: adam}\n")
    with pytest.raises(SpecError, match="max_lenght: unknown parameter of processor 'text'; did you mean 'max_length'"):
        validate(load_spec(spec))
