"""d2v's text modality: data2vec-text (as Hugging Face's ``Data2VecTextModel``), its tokenizers,
processor, datasets, presets and fairseq checkpoint importers (data2vec 1.0 and 2.0 text). Registered through the ``d2v`` entry point ``text``."""

from d2v import hookimpl


@hookimpl
def d2v_register(register):
    register("feature_extractor", "text.embeddings", "d2v_text.feature_extractor:TextEmbeddings",
             summary="word + RoBERTa position (padding-aware) + optional token type embeddings, LayerNorm, dropout",
             modalities=("text",))
    register("encoder", "text.transformer", "d2v_text.encoder:TextTransformerEncoder",
             summary="post-LN Transformer (SDPA, padding mask), optional pooler; decoder mode: causal mask, "
                     "cross-attention, key/value cache")
    register("model", "data2vec-text-base", "d2v_text.presets:data2vec_text_base",
             summary="data2vec-text Base: 12 layers, 768 wide, 50265 BPE tokens (facebook/data2vec-text-base)")
    register("model", "data2vec-text-large", "d2v_text.presets:data2vec_text_large",
             summary="data2vec-text Large: 24 layers, 1024 wide, 16 heads")
    register("model", "data2vec-text-tiny", "d2v_text.presets:data2vec_text_tiny",
             summary="a tiny data2vec-text (2 x 64, the demo tokenizer's 1500 tokens) for tests and CPU demos")
    register("hf_converter", "Data2VecTextModel", "d2v_text.hf:TextModelConverter",
             summary="import/export Hugging Face Data2VecTextModel checkpoints")
    register("hf_converter", "Data2VecTextForCausalLM", "d2v_text.hf:TextCausalLMConverter",
             summary="import/export Hugging Face Data2VecTextForCausalLM checkpoints")
    register("hf_converter", "Data2VecTextForMaskedLM", "d2v_text.hf:TextMaskedLMConverter",
             summary="import/export Hugging Face Data2VecTextForMaskedLM checkpoints")
    register("hf_converter", "Data2VecTextForSequenceClassification", "d2v_text.hf:TextSequenceClassificationConverter",
             summary="import/export Hugging Face Data2VecTextForSequenceClassification checkpoints")
    register("hf_converter", "Data2VecTextForMultipleChoice", "d2v_text.hf:TextMultipleChoiceConverter",
             summary="import/export Hugging Face Data2VecTextForMultipleChoice checkpoints")
    register("hf_converter", "Data2VecTextForTokenClassification", "d2v_text.hf:TextTokenClassificationConverter",
             summary="import/export Hugging Face Data2VecTextForTokenClassification checkpoints")
    register("hf_converter", "Data2VecTextForQuestionAnswering", "d2v_text.hf:TextQuestionAnsweringConverter",
             summary="import/export Hugging Face Data2VecTextForQuestionAnswering checkpoints")
    register("fairseq_converter", "data2vec_text", "d2v_text.fairseq:Data2VecTextImporter",
             summary="fairseq data2vec 1.0 text (data2vec_text) and RoBERTa-layout GLUE fine-tunings -> text backbone, "
                     "masked_lm or text_classification head")
    register("fairseq_converter", "data2vec_multi_text", "d2v_text.fairseq:Data2VecMultiTextImporter",
             summary="fairseq data2vec 2.0 text checkpoints (data2vec_multi, TEXT) -> pretraining model with Decoder1d "
                     "and EMA teacher")
    register("fairseq_converter", "data2vec_text_classification", "d2v_text.fairseq:Data2VecTextClassificationImporter",
             summary="fairseq data2vec 2.0 GLUE fine-tunings (data2vec_text_classification) -> text_classification")
    register("processor", "text", "d2v_text.processor:TextProcessor",
             summary="RoBERTa-style tokenization (byte-level BPE or sentencepiece), truncation/QA windows, "
                     "label alignment, BERT masking, padded batches",
             modalities=("text",))
    register("dataset", "text_lines", "d2v_text.datasets:TextLines",
             summary="raw text: one document per line or blank-line separated paragraphs (LM, pretraining)",
             modalities=("text",), paths=("path",))
    register("dataset", "glue_tsv", "d2v_text.datasets:GlueTSV",
             summary="GLUE task TSVs: <root>/<TASK>/{train,dev,test}.tsv, every task's columns and labels",
             modalities=("text",), paths=("root",))
    register("dataset", "squad_json", "d2v_text.datasets:SquadJSON",
             summary="SQuAD v1.1 / v2.0 json (one example per question, is_impossible)",
             modalities=("text",), paths=("path",))
    register("dataset", "conll", "d2v_text.datasets:CoNLL",
             summary="CoNLL-2003 column files (word ... TAG, blank lines between sentences, -DOCSTART-)",
             modalities=("text",), paths=("path",))
    register("dataset", "swag_csv", "d2v_text.datasets:SwagCSV",
             summary="SWAG csv (sent1, sent2, ending0-3, label) for multiple choice",
             modalities=("text",), paths=("path",))


@hookimpl
def d2v_cli_commands(subparsers):
    from d2v_text.cli import add_commands

    add_commands(subparsers)
