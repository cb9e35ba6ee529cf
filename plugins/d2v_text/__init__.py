"""d2v's text modality: data2vec-text (as Hugging Face's ``Data2VecTextModel``), its tokenizers,
processor, datasets and presets. Registered through the ``d2v`` entry point ``text``."""

from d2v import hookimpl


@hookimpl
def d2v_register(register):
    register("processor", "text", "d2v_text.processor:TextProcessor",
             summary="RoBERTa-style tokenization (byte-level BPE or sentencepiece), truncation/QA windows, "
                     "label alignment, BERT masking, padded batches")
    register("dataset", "text_lines", "d2v_text.datasets:TextLines",
             summary="raw text: one document per line or blank-line separated paragraphs (LM, pretraining)")
    register("dataset", "glue_tsv", "d2v_text.datasets:GlueTSV",
             summary="GLUE task TSVs: <root>/<TASK>/{train,dev,test}.tsv, every task's columns and labels")
    register("dataset", "squad_json", "d2v_text.datasets:SquadJSON",
             summary="SQuAD v1.1 / v2.0 json (one example per question, is_impossible)")
    register("dataset", "conll", "d2v_text.datasets:CoNLL",
             summary="CoNLL-2003 column files (word ... TAG, blank lines between sentences, -DOCSTART-)")
    register("dataset", "swag_csv", "d2v_text.datasets:SwagCSV",
             summary="SWAG csv (sent1, sent2, ending0-3, label) for multiple choice")


@hookimpl
def d2v_cli_commands(subparsers):
    from d2v_text.cli import add_commands

    add_commands(subparsers)
