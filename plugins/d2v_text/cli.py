"""``d2v tokenizer train CORPUS... --vocab-size N --out DIR`` (added through the
``d2v_cli_commands`` hook): a sentencepiece vocabulary with RoBERTa's special tokens, ready for
``data.processor.tokenizer: DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from d2v.api.errors import SpecError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="text tokenizers: train a sentencepiece vocabulary")
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="train a sentencepiece vocabulary with <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4")
    t.add_argument("corpus", nargs="+", help="UTF-8 text files (one sentence/document per line) or directories of *.txt")
    t.add_argument("--vocab-size", type=int, required=True, help="number of pieces, specials included (>= 300)")
    t.add_argument("--out", required=True, help="output directory (spm.model, spm.vocab, tokenizer_info.json)")
    t.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    t.add_argument("--character-coverage", type=float, default=0.9995)
    t.add_argument("--force", action="store_true", help="replace an existing --out directory")
    t.set_defaults(fn=train)


def train(args: argparse.Namespace) -> int:
    from d2v_text.tokenizer import load_tokenizer, train_sentencepiece

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SpecError(f"tokenizer train: '{out}' exists and is not empty; pass --force to replace it.")
    train_sentencepiece(args.corpus, vocab_size=args.vocab_size, out=out, model_type=args.model_type,
                        character_coverage=args.character_coverage, overwrite=True)
    tokenizer = load_tokenizer(out)
    print(f"wrote {out / 'spm.model'} ({tokenizer.vocab_size} tokens; <s>={tokenizer.bos_token_id} "
          f"<pad>={tokenizer.pad_token_id} </s>={tokenizer.eos_token_id} <unk>={tokenizer.unk_token_id} "
          f"<mask>={tokenizer.mask_token_id}); use it with data.processor.tokenizer: {out}")
    return 0
