#!/usr/bin/env python
"""Generate d2v's small synthetic text corpora in the real on-disk layouts of each task.

    python experiments/data/make_text_demo.py [--out experiments/data/text_demo]

Writes (about 1 MB in all)::

    lm/{train,valid}.txt                    raw text, one document per line (text_lines)
    SST-2/{train,dev}.tsv                   GLUE layout, "sentence<TAB>label" (glue_tsv, task sst2)
    conll/{train,valid,test}.txt            CoNLL-2003 columns "word POS chunk NER" (conll)
    squad/{train,dev}-v1.1.json             SQuAD v1.1 json (squad_json)
    swag/{train,val}.csv                    SWAG csv (swag_csv)
    tokenizer/{vocab.json,merges.txt}       byte-level BPE trained on all of the above with
                                            ``tokenizers``: <s> <pad> </s> <unk> at 0-3, <mask> last

Every task is built from templates over small closed word lists so that a 2-layer model learns
it in a few minutes on a CPU, with structure worth learning: each animal has its own sound,
each city its country, weekdays follow each other (masked LM / pretraining); sentiment words
with negation (classification); names, places and companies in varied contexts, some of them
unseen in training (NER); questions whose answer type and cue words pick one fact out of a
paragraph with a distractor (QA); an object that determines the right continuation (SWAG).
Everything comes from seeded ``random.Random`` instances (one per task), so re-running the
script reproduces the files byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path

SEED = 20260101
VOCAB_SIZE = 1500

FIRST = ["John", "Mary", "Anna", "Peter", "Laura", "David", "Sofia", "James", "Emma", "Lucas", "Olga", "Ahmed",
         "Chen", "Maria", "Tom", "Nina", "Omar", "Grace", "Ivan", "Julia"]
LAST = ["Smith", "Brown", "Garcia", "Miller", "Novak", "Khan", "Lopez", "Weber", "Rossi", "Tanaka", "Silva",
        "Dubois", "Jensen", "Kowalski", "Murphy", "Costa"]
# names that appear only in the NER dev/test files (the model must use the context)
UNSEEN_FIRST = ["Hugo", "Irene", "Felix", "Clara"]
UNSEEN_LAST = ["Becker", "Moreau", "Larsen"]
CITIES = {"Paris": "France", "Lyon": "France", "Berlin": "Germany", "Munich": "Germany", "Madrid": "Spain",
          "Seville": "Spain", "Rome": "Italy", "Milan": "Italy", "Tokyo": "Japan", "Osaka": "Japan",
          "Lisbon": "Portugal", "Porto": "Portugal", "Cairo": "Egypt", "Lima": "Peru", "Oslo": "Norway",
          "Dublin": "Ireland"}
UNSEEN_CITIES = ["Geneva", "Krakow", "Nairobi"]
COMPANIES = ["Acme Corp", "Blue River Bank", "Nova Systems", "Green Leaf Foods", "Atlas Motors", "Sun Energy",
             "Pioneer Press", "Delta Air", "Orion Labs", "Maple Books"]
UNSEEN_COMPANIES = ["Zenith Group", "Harbor Tech"]
JOBS = ["engineer", "teacher", "doctor", "pilot", "chef", "lawyer", "nurse", "writer", "farmer", "designer"]
HOBBIES = ["chess", "tennis", "painting", "cooking", "hiking", "music", "swimming", "photography"]
ANIMALS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars", "horse": "neighs",
           "owl": "hoots", "bee": "buzzes", "sheep": "bleats", "wolf": "howls"}
PLACES = ["garden", "farm", "forest", "park", "barn", "field", "yard", "zoo"]
TIMES = ["morning", "evening", "night", "noon"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FRUITS = {"lemon": "sour", "honey": "sweet", "coffee": "bitter", "chili": "hot", "ice": "cold", "salt": "salty"}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}


# ---------------------------------------------------------------------------------------- LM corpus
def lm_sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        animal = rng.choice(list(ANIMALS))
        return f"The {animal} {ANIMALS[animal]} in the {rng.choice(PLACES)} every {rng.choice(TIMES)}."
    if kind == 1:
        city = rng.choice(list(CITIES))
        return f"{city} is a city in {CITIES[city]}."
    if kind == 2:
        k = rng.randrange(len(DAYS))
        return f"After {DAYS[k]} comes {DAYS[(k + 1) % 7]}."
    if kind == 3:
        thing = rng.choice(list(FRUITS))
        return f"The {thing} tastes {FRUITS[thing]}."
    if kind == 4:
        thing = rng.choice(list(COLORS))
        return f"The color of the {thing} is {COLORS[thing]}."
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city = rng.choice(list(CITIES))
    return f"{name} lives in {city} and works as a {rng.choice(JOBS)} for {rng.choice(COMPANIES)}."


def lm_corpus(rng: random.Random, n: int) -> list[str]:
    return [" ".join(lm_sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(n)]


# ---------------------------------------------------------------------------------------- SST-2
POSITIVE = ["good", "great", "wonderful", "brilliant", "delightful", "moving", "funny", "charming", "superb"]
NEGATIVE = ["bad", "boring", "awful", "dull", "terrible", "clumsy", "tedious", "weak", "messy"]
SUBJECTS = ["the film", "this movie", "the story", "the acting", "the script", "the ending", "the cast",
            "the music", "the director 's work", "every scene"]
INTENSIFIERS = ["", "", "really ", "very ", "truly ", "quite "]


def sst_clause(rng: random.Random, positive: bool) -> str:
    negated = rng.random() < 0.2
    word = rng.choice(POSITIVE if positive != negated else NEGATIVE)
    verb = rng.choice(["is", "was", "feels", "seems"])
    return f"{rng.choice(SUBJECTS)} {verb} {'not ' if negated else ''}{rng.choice(INTENSIFIERS)}{word}"


def sst_example(rng: random.Random) -> tuple[str, int]:
    """A sentiment sentence; in a quarter of them a "but" clause of either polarity comes first
    and the label is the second clause's, so word counting alone does not solve the task."""
    positive = rng.random() < 0.5
    body = sst_clause(rng, positive)
    if rng.random() < 0.25:
        body = f"{sst_clause(rng, rng.random() < 0.5)} , but {body}"
    if rng.random() < 0.3:
        body += rng.choice([" from start to finish", " for most of its running time", " , honestly", " overall"])
    return body + " .", int(positive)


# ---------------------------------------------------------------------------------------- CoNLL NER
def ner_sentence(rng: random.Random, unseen: bool) -> list[tuple[str, str, str, str]]:
    """(word, POS, chunk, NER) tokens of one sentence."""
    def pick(pool: list[str], extra: list[str]) -> str:
        return rng.choice(extra) if unseen and rng.random() < 0.3 else rng.choice(pool)

    person = [pick(FIRST, UNSEEN_FIRST)] + ([pick(LAST, UNSEEN_LAST)] if rng.random() < 0.7 else [])
    place = pick(list(CITIES), UNSEEN_CITIES)
    org = pick(COMPANIES, UNSEEN_COMPANIES).split()
    template = rng.randrange(5)
    parts: list[tuple[list[str], str]] = []  # (words, entity type or "O")
    if template == 0:
        parts = [(person, "PER"), (["visited"], "O"), ([place], "LOC"), (["with", "colleagues", "from"], "O"), (org, "ORG")]
    elif template == 1:
        parts = [(org, "ORG"), (["opened", "an", "office", "in"], "O"), ([place], "LOC"), (["last", "year"], "O")]
    elif template == 2:
        parts = [(["Yesterday"], "O"), (person, "PER"), (["joined"], "O"), (org, "ORG"), (["as", "a"], "O"),
                 ([rng.choice(JOBS)], "O")]
    elif template == 3:
        parts = [(["The", "mayor", "of"], "O"), ([place], "LOC"), (["met"], "O"), (person, "PER"), (["on"], "O"),
                 ([rng.choice(DAYS)], "O")]
    else:
        parts = [(person, "PER"), (["said"], "O"), (org, "ORG"), (["will", "move", "to"], "O"), ([place], "LOC")]
    tokens = []
    for words, kind in parts:
        for k, word in enumerate(words):
            if kind == "O":
                tokens.append((word, "NN" if word.islower() else "NNP", "I-NP", "O"))
            else:
                tokens.append((word, "NNP", "I-NP", f"{'B' if k == 0 else 'I'}-{kind}"))
    tokens.append((".", ".", "O", "O"))
    return tokens


def conll_file(rng: random.Random, n: int, unseen: bool) -> str:
    out = ["-DOCSTART- -X- -X- O", ""]
    for i in range(n):
        if i and i % 25 == 0:
            out += ["-DOCSTART- -X- -X- O", ""]
        out += [" ".join(t) for t in ner_sentence(rng, unseen)] + [""]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------- SQuAD
def squad_paragraph(rng: random.Random, index: int, split: str) -> dict:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    name, (he, his) = f"{first} {last}", rng.choice([("He", "his"), ("She", "her")])
    born, other = rng.sample(list(CITIES), 2)
    year = str(rng.randint(1940, 2005))
    company, job, hobby = rng.choice(COMPANIES), rng.choice(JOBS), rng.choice(HOBBIES)
    facts = [f"{name} was born in {born} in {year}.", f"{he} works for {company} as a {job}.",
             f"In {his} free time, {first} enjoys {hobby}."]
    if rng.random() < 0.6:
        facts.insert(rng.randint(1, 3), f"{first}'s brother lives in {other}.")
    context = " ".join(facts)
    questions = [
        (f"Where was {name} born?", born, f"born in {born}"),
        (f"In which year was {first} born?", year, f"in {year}"),
        (f"Which company does {first} work for?", company, f"for {company}"),
        (f"What is the job of {name}?", job, f"as a {job}"),
        (f"What does {first} enjoy in free time?", hobby, f"enjoys {hobby}"),
    ]
    qas = []
    for k, (question, answer, cue) in enumerate(rng.sample(questions, 3)):
        start = context.index(cue) + len(cue) - len(answer)
        assert context[start: start + len(answer)] == answer
        qas.append({"id": f"{split}-{index:04d}-{k}", "question": question,
                    "answers": [{"text": answer, "answer_start": start}]})
    return {"context": context, "qas": qas}


def squad_file(rng: random.Random, n: int, split: str) -> str:
    paragraphs = [squad_paragraph(rng, i, split) for i in range(n)]
    articles = [{"title": f"People_{k}", "paragraphs": paragraphs[k: k + 20]} for k in range(0, n, 20)]
    return json.dumps({"version": "1.1", "data": articles}, ensure_ascii=False, indent=None) + "\n"


# ---------------------------------------------------------------------------------------- SWAG
OBJECTS = {
    "ball": "kicks it across the field", "knife": "cuts the bread into slices", "book": "reads the first page",
    "guitar": "plays a slow song", "broom": "sweeps the dusty floor", "phone": "calls an old friend",
    "cup": "drinks the hot tea", "pen": "writes a short letter", "camera": "takes a photo of the sea",
    "hammer": "hits the nail into the wall", "towel": "dries the wet dishes", "map": "looks for the nearest town",
}


def swag_csv(rng: random.Random, n: int, split: str) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["", "video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
                     "ending0", "ending1", "ending2", "ending3", "label"])
    objects = list(OBJECTS)
    for i in range(n):
        obj = rng.choice(objects)
        first, pronoun = rng.choice(FIRST), rng.choice(["He", "She"])
        sent1 = f"{first} picks up the {obj} in the {rng.choice(['kitchen', 'garden', 'office', 'hall', 'shed'])}."
        wrong = rng.sample([o for o in objects if o != obj], 3)
        endings = [OBJECTS[o] + "." for o in wrong]
        label = rng.randrange(4)
        endings.insert(label, OBJECTS[obj] + ".")
        writer.writerow([i, f"demo-{split}-{i // 10}", str(i), f"{sent1} {pronoun}", sent1, pronoun, "gold",
                         *endings, label])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- main
def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "text_demo"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)

    rng = random.Random(SEED)
    write(out / "lm" / "train.txt", "\n".join(lm_corpus(rng, 3000)) + "\n")
    write(out / "lm" / "valid.txt", "\n".join(lm_corpus(rng, 200)) + "\n")

    rng = random.Random(SEED + 1)
    for split, n in (("train", 2000), ("dev", 400)):
        rows = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in (sst_example(rng) for _ in range(n))]
        write(out / "SST-2" / f"{split}.tsv", "\n".join(rows) + "\n")

    rng = random.Random(SEED + 2)
    write(out / "conll" / "train.txt", conll_file(rng, 1000, unseen=False))
    write(out / "conll" / "valid.txt", conll_file(rng, 200, unseen=True))
    write(out / "conll" / "test.txt", conll_file(rng, 200, unseen=True))

    rng = random.Random(SEED + 3)
    write(out / "squad" / "train-v1.1.json", squad_file(rng, 500, "train"))
    write(out / "squad" / "dev-v1.1.json", squad_file(rng, 80, "dev"))

    rng = random.Random(SEED + 4)
    write(out / "swag" / "train.csv", swag_csv(rng, 1000, "train"))
    write(out / "swag" / "val.csv", swag_csv(rng, 200, "val"))

    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread: the BPE merges are reproducible
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
    from d2v_text.tokenizer import train_byte_level_bpe

    sources = sorted(p for p in out.rglob("*") if p.is_file())
    train_byte_level_bpe(sources, vocab_size=VOCAB_SIZE, out=out / "tokenizer")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
