"""fairseq data2vec 1.0 text checkpoints (``data2vec_text``, RoBERTa layout) import exactly.

(fairseq's own checkpoints are checked in test_fairseq_oracle_text.py; this module checks the
names, legacy layouts and errors, and the round trip through Hugging Face's ``Data2VecText*``.)

A tiny random Hugging Face ``Data2VecText*`` model is written under fairseq's names
(``encoder.sentence_encoder.*``, ``encoder.lm_head.*``, ``classification_heads.<name>.*``, mapped
here independently of the importer, with no token-type table: HF's conversion zeroed it) into
fairseq's on-disk layout; ``import_fairseq`` and ``d2v convert`` must give the same outputs on a
padded batch within 1e-5, and ``--to hf`` must load back into ``transformers`` with equal outputs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from d2v.cli.main import main
from d2v.interop.convert import load_d2v_checkpoint
from d2v.api.errors import SpecError
from d2v.interop.fairseq import import_fairseq
from fairseq_fixtures import save_fairseq_checkpoint
from max_diff import MaxDiff
from text_pooler import assert_pooler_is_reported

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")
ATOL = 1e-5
MAX_DIFF = MaxDiff(ATOL)
PAD, VOCAB, DIM, LAYERS = 1, 60, 32, 2
HF_CONFIG = dict(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=30, type_vocab_size=1, layer_norm_eps=1e-5,
                 pad_token_id=PAD, hidden_act="gelu")


close = MAX_DIFF.check


def tokens(lengths=(12, 8, 3), seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        rows[i, :n] = torch.randint(4, VOCAB, (n,), generator=g)
        rows[i, 0], rows[i, n - 1] = 0, 2
    return rows


def hf_model(cls, seed: int = 0, *, pooler: bool | None = None, **kwargs):
    torch.manual_seed(seed)
    config = transformers.Data2VecTextConfig(**{**HF_CONFIG, **kwargs})
    config._attn_implementation = "eager"
    model = (cls(config) if pooler is None else cls(config, add_pooling_layer=pooler)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.uniform_(-0.2, 0.2)
            elif "LayerNorm.weight" in name or "layer_norm.weight" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(("query.weight", "key.weight")):
                param.normal_(0.0, 0.2)
        backbone = model.data2vec_text if hasattr(model, "data2vec_text") else model
        backbone.embeddings.token_type_embeddings.weight.zero_()  # fairseq has no token types
    return model


#: Hugging Face name (backbone, after ``data2vec_text.``) -> fairseq name, written from fairseq's
#: TransformerEncoder / TransformerEncoderLayer attribute names
def fairseq_name(hf: str) -> str | None:
    s = "encoder.sentence_encoder."
    fixed = {"embeddings.word_embeddings.weight": s + "embed_tokens.weight",
             "embeddings.position_embeddings.weight": s + "embed_positions.weight",
             "embeddings.LayerNorm.weight": s + "layernorm_embedding.weight",
             "embeddings.LayerNorm.bias": s + "layernorm_embedding.bias",
             "lm_head.dense.weight": "encoder.lm_head.dense.weight", "lm_head.dense.bias": "encoder.lm_head.dense.bias",
             "lm_head.layer_norm.weight": "encoder.lm_head.layer_norm.weight",
             "lm_head.layer_norm.bias": "encoder.lm_head.layer_norm.bias", "lm_head.bias": "encoder.lm_head.bias",
             "classifier.dense.weight": "classification_heads.mnli.dense.weight",
             "classifier.dense.bias": "classification_heads.mnli.dense.bias",
             "classifier.out_proj.weight": "classification_heads.mnli.out_proj.weight",
             "classifier.out_proj.bias": "classification_heads.mnli.out_proj.bias"}
    if hf in fixed:
        return fixed[hf]
    if not hf.startswith("encoder.layer."):
        return None
    index, rest = hf[len("encoder.layer."):].split(".", 1)
    module, kind = rest.rsplit(".", 1)
    layer = {"attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
             "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
             "attention.output.LayerNorm": "self_attn_layer_norm", "intermediate.dense": "fc1",
             "output.dense": "fc2", "output.LayerNorm": "final_layer_norm"}[module]
    return f"{s}layers.{index}.{layer}.{kind}"


def fairseq_state(model, *, regression_head: bool = True) -> dict[str, torch.Tensor]:
    """The HF model's weights as fairseq's ``Data2VecTextModel.state_dict()`` holds them."""
    state = {}
    for name, tensor in model.state_dict().items():
        bare = name[len("data2vec_text."):] if name.startswith("data2vec_text.") else name
        if bare in ("embeddings.token_type_embeddings.weight", "embeddings.position_ids",
                    "embeddings.token_type_ids", "lm_head.decoder.bias"):
            continue
        if bare == "lm_head.decoder.weight":  # RobertaLMHead.weight is the embedding table itself
            state["encoder.lm_head.weight"] = tensor
            continue
        theirs = fairseq_name(bare)
        assert theirs is not None, name
        state[theirs] = tensor
    state["encoder.sentence_encoder.version"] = torch.tensor([3.0])
    if regression_head:  # head_layers 2: Linear(D, 2D) -> GELU -> Linear(2D, D)
        g = torch.Generator().manual_seed(9)
        state.update({"encoder.regression_head.0.weight": torch.randn(2 * DIM, DIM, generator=g),
                      "encoder.regression_head.0.bias": torch.randn(2 * DIM, generator=g),
                      "encoder.regression_head.2.weight": torch.randn(DIM, 2 * DIM, generator=g),
                      "encoder.regression_head.2.bias": torch.randn(DIM, generator=g)})
    return state


def data2vec_text_cfg(**encoder) -> dict:
    """A cfg as examples/data2vec/config/text/pretraining/base.yaml stores it, at test size."""
    return {
        "_name": None, "common": {"fp16": True, "seed": 1},
        "task": {"_name": "masked_lm", "data": "/data/bookwiki", "tokens_per_sample": 28, "mask_prob": 0.35},
        "optimization": {"max_update": 1000000, "lr": [0.0002], "clip_norm": 5.0},
        "model": {
            "_name": "data2vec_text", "max_positions": "${task.tokens_per_sample}", "head_layers": 2,
            "load_checkpoint_heads": False, "loss_beta": 4.0, "loss_scale": 1.0, "average_top_k_layers": 2,
            "layer_norm_target_layer": True, "instance_norm_target_layer": False, "batch_norm_target_layer": False,
            "instance_norm_targets": False, "layer_norm_targets": False, "ema_decay": 0.999, "ema_end_decay": 0.9999,
            "ema_anneal_end_step": 300000, "ema_transformer_layers_only": True,
            "transformer": {
                "activation_fn": "gelu", "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
                "adaptive_input": False, "max_source_positions": 28, "no_token_positional_embeddings": False,
                "layernorm_embedding": True, "no_scale_embedding": True, "checkpoint_activations": False,
                "quant_noise": {"pq": 0.0, "pq_block_size": 8, "scalar": 0.0},
                "encoder": {"embed_path": None, "embed_dim": DIM, "ffn_embed_dim": 64, "layers": LAYERS,
                            "attention_heads": 4, "normalize_before": False, "learned_pos": True, "layerdrop": 0.0,
                            "layers_to_keep": None, "xformers_att_config": None, **encoder},
            },
        },
    }


def roberta_cfg() -> dict:
    """A RoBERTa GLUE fine-tuning cfg (examples/roberta/config/finetuning: flat model fields)."""
    return {"_name": None, "task": {"_name": "sentence_prediction", "num_classes": 3},
            "model": {"_name": "roberta", "encoder_layers": LAYERS, "encoder_embed_dim": DIM,
                      "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 4, "activation_fn": "gelu",
                      "pooler_activation_fn": "tanh", "dropout": 0.1, "attention_dropout": 0.1,
                      "activation_dropout": 0.0, "pooler_dropout": 0.0, "max_positions": 28,
                      "encoder_normalize_before": False, "layernorm_embedding": True, "no_scale_embedding": True,
                      "encoder_learned_pos": True, "untie_weights_roberta": False}}


def hf_inputs(ids):
    return {"input_ids": ids, "attention_mask": ids.ne(PAD).long()}


def d2v_batch(ids):
    return {"inputs": ids, "padding_mask": ids.eq(PAD)}


def student(model, ids):
    """The last hidden state of a pretraining model's student (or of a backbone)."""
    with torch.no_grad():
        fe = model.feature_extractor(ids, ids.eq(PAD))
        return model.encoder(fe.features, fe.padding_mask).last_hidden_state


def test_pretrained_backbone_matches_and_round_trips_through_hugging_face(tmp_path, capsys):
    hf = hf_model(transformers.Data2VecTextModel, pooler=False)
    path = save_fairseq_checkpoint(tmp_path / "nlp_base.pt", data2vec_text_cfg(), fairseq_state(hf))
    ids = tokens()
    with torch.no_grad():
        want = hf(**hf_inputs(ids)).last_hidden_state
    model, result = import_fairseq(path)
    assert result.task == "pretrain" and "head" not in result.spec
    assert result.spec["objective"]["name"] == "data2vec" and result.spec["objective"]["head_layers"] == 2
    assert result.spec["feature_extractor"]["type_vocab_size"] == 0
    close("backbone", student(model, ids), want)
    notes = "\n".join(result.notes)
    assert "no EMA teacher" in notes and "RoBERTa tokenizer" in notes and "not imported" not in notes
    with torch.no_grad():  # without encoder._ema the teacher starts as the student, as fairseq's does
        fe = model.teacher.model["feature_extractor"](ids, ids.eq(PAD))
        close("teacher_copy", model.teacher.model["encoder"](fe.features, fe.padding_mask).last_hidden_state, want)

    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    assert "task pretrain" in capsys.readouterr().out
    close("backbone_cli", load_d2v_checkpoint(tmp_path / "out")(d2v_batch(ids)).last_hidden_state, want)
    assert main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert_pooler_is_reported(tmp_path / "hf", capsys.readouterr().out)
    again = transformers.Data2VecTextModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    with torch.no_grad():
        close("backbone_to_hf", again(**hf_inputs(ids)).last_hidden_state, want)


def test_lm_head_imports_as_masked_lm(tmp_path):
    hf = hf_model(transformers.Data2VecTextForMaskedLM)
    path = save_fairseq_checkpoint(tmp_path / "lm.pt", data2vec_text_cfg(), fairseq_state(hf), dictconfig=False)
    ids = tokens()
    with torch.no_grad():
        want = hf(**hf_inputs(ids)).logits
    model, result = import_fairseq(path)
    assert result.spec["head"]["name"] == "masked_lm" and result.spec["head"]["tie_word_embeddings"] is True
    close("masked_lm", model(d2v_batch(ids)).logits, want)
    assert main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    again = transformers.Data2VecTextForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        close("masked_lm_to_hf", again(**hf_inputs(ids)).logits, want)


@pytest.mark.parametrize("layout", ["data2vec_text", "roberta"])
def test_glue_finetuned_classifier_matches(tmp_path, layout):
    hf = hf_model(transformers.Data2VecTextForSequenceClassification, num_labels=3, classifier_dropout=0.0)
    cfg = data2vec_text_cfg() if layout == "data2vec_text" else roberta_cfg()
    path = save_fairseq_checkpoint(tmp_path / "mnli.pt", cfg, fairseq_state(hf, regression_head=False))
    ids = tokens()
    with torch.no_grad():
        want = hf(**hf_inputs(ids)).logits
    model, result = import_fairseq(path)
    assert result.task == "finetune"
    assert result.spec["head"] == {"name": "text_classification", "num_labels": 3, "classifier_dropout": 0.0}
    close("classifier", model(d2v_batch(ids)).logits, want)
    assert not any("not imported" in n for n in result.notes), result.notes
    assert main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    again = transformers.Data2VecTextForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        close("classifier_to_hf", again(**hf_inputs(ids)).logits, want)


def test_legacy_names_drift_and_missing_tensors(tmp_path):
    hf = hf_model(transformers.Data2VecTextModel, pooler=False)
    state = fairseq_state(hf)
    old = {k.replace(".layernorm_embedding.", ".emb_layer_norm."): v for k, v in state.items()}  # older files
    cfg = data2vec_text_cfg()
    cfg["model"]["a_future_option"] = 1  # a newer fairseq's key
    del cfg["model"]["transformer"]["encoder"]["layerdrop"]  # an older fairseq's: the default (0) applies
    path = save_fairseq_checkpoint(tmp_path / "old.pt", cfg, old)
    model, result = import_fairseq(path)
    notes = "\n".join(result.notes)
    assert "cfg.model.transformer.encoder.layerdrop is missing" in notes and "ignored: a_future_option" in notes
    ids = tokens()
    with torch.no_grad():
        close("legacy", student(model, ids), hf(**hf_inputs(ids)).last_hidden_state)

    broken = dict(state)
    del broken["encoder.sentence_encoder.layers.1.fc2.weight"]
    path = save_fairseq_checkpoint(tmp_path / "broken.pt", data2vec_text_cfg(), broken)
    with pytest.raises(SpecError, match=r"lacks 1 tensors.*encoder\.sentence_encoder\.layers\.1\.fc2\.weight"):
        import_fairseq(path)


def test_a_finetuning_spec_starts_from_the_fairseq_file(tmp_path):
    """``model.init.checkpoint: nlp_base.pt``: the backbone comes from the .pt, the new head stays."""
    from d2v.api import plugins
    from d2v.spec.model import build_task_model
    from d2v.interop.weights import load_initial_weights

    hf = hf_model(transformers.Data2VecTextForMaskedLM)
    path = save_fairseq_checkpoint(tmp_path / "nlp_base.pt", data2vec_text_cfg(), fairseq_state(hf))
    spec = {"preset": "data2vec-text-tiny",
            "feature_extractor": {"vocab_size": VOCAB, "max_position_embeddings": 30, "type_vocab_size": 0},
            "encoder": {"dim": DIM, "layers": LAYERS, "heads": 4, "ffn_dim": 64},
            "head": {"name": "text_classification", "num_labels": 2}, "init": {"checkpoint": str(path)}}
    model = build_task_model(spec, plugins.registry())
    load_initial_weights(model, path)
    model.eval()
    ids = tokens()
    with torch.no_grad():
        fe = model.feature_extractor(ids, ids.eq(PAD))
        want = hf.data2vec_text(**hf_inputs(ids)).last_hidden_state
        close("init_checkpoint", model.encoder(fe.features, fe.padding_mask).last_hidden_state, want)


def test_without_a_token_type_table_types_must_be_zero():
    """``type_vocab_size: 0`` (fairseq): zeros are accepted and change nothing; other types are an error."""
    from d2v_text.feature_extractor import TextEmbeddings

    fe = TextEmbeddings(dim=16, vocab_size=VOCAB, max_position_embeddings=30, type_vocab_size=0, dropout=0.0)
    assert fe.token_type_embeddings is None
    ids = tokens()
    plain = fe(ids).features
    torch.testing.assert_close(fe(ids, token_type_ids=torch.zeros_like(ids)).features, plain, atol=0, rtol=0)
    with pytest.raises(SpecError, match="type_vocab_size: 0"):
        fe(ids, token_type_ids=torch.ones_like(ids))


def test_report_max_abs_errors():
    MAX_DIFF.report("fairseq text import")
    assert MAX_DIFF.worst <= ATOL
