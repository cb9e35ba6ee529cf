"""Text task heads: losses equal Hugging Face's (its head modules and loss functions on random
tensors), metrics equal hand-computed values, fill-mask/n-best/word-level predictions find what
was planted, and cached generation equals full recomputation on left- and right-padded prompts.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from d2v.api.errors import SpecError
from d2v.api.interfaces import Encoder, EncoderOutput, FeatureExtractor, FeatureExtractorOutput, HeadOutput
from d2v.spec.model import TaskModel
from d2v_heads.text.causal_lm import CausalLMHead, filter_logits, generate, position_ids_for
from d2v_heads.text.entities import entity_counts, entity_scores, get_entities
from d2v_heads.text.masked_lm import MaskedLMHead
from d2v_heads.text.multiple_choice import MultipleChoiceHead
from d2v_heads.text.question_answering import QuestionAnsweringHead, best_answer
from d2v_heads.text.squad_metrics import f1_score, normalize_answer, squad_counts, squad_summary
from d2v_heads.text.text_classification import TextClassificationHead
from d2v_heads.text.token_classification import TokenClassificationHead

transformers = pytest.importorskip("transformers")
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402
from transformers.models.data2vec.modeling_data2vec_text import (  # noqa: E402
    Data2VecTextClassificationHead,
    Data2VecTextLMHead,
)

pytestmark = pytest.mark.usefixtures("single_thread")

D, V = 16, 40


def hf_config(**kwargs):
    settings = {"vocab_size": V, "hidden_size": D, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 32, "layer_norm_eps": 1e-5, **kwargs}
    return transformers.Data2VecTextConfig(**settings)


def hidden(batch=3, length=7, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, D, generator=g)
    padding = None if lengths is None else torch.arange(length)[None] >= torch.tensor(lengths)[:, None]
    return EncoderOutput(last_hidden_state=x, padding_mask=padding)


# --------------------------------------------------------------------------- LM heads


def lm_pair(cls, **kwargs):
    """A d2v LM head with the weights of an HF ``Data2VecTextLMHead`` (decoder tied to an embedding)."""
    torch.manual_seed(0)
    hf = Data2VecTextLMHead(hf_config())
    embedding = nn.Embedding(V, D)
    nn.init.normal_(hf.bias)
    ours = cls(input_dim=D, vocab_size=V, **kwargs)
    ours.tie_input_embeddings(embedding)
    with torch.no_grad():
        for name in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias"):
            ours.get_parameter(name).copy_(torch.randn_like(hf.get_parameter(name)))
            hf.get_parameter(name).copy_(ours.get_parameter(name))
        hf.decoder.weight.copy_(embedding.weight)
        hf.decoder.bias.copy_(hf.bias)
        ours.bias.copy_(hf.bias)
    return ours, hf, embedding


@torch.no_grad()
def test_masked_lm_logits_and_loss_equal_hf():
    ours, hf, embedding = lm_pair(MaskedLMHead)
    enc = hidden()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, V, (3, 7), generator=g)
    labels[torch.rand(3, 7, generator=g) < 0.6] = -100
    out = ours(enc, {"labels": labels})
    expected_logits = hf(enc.last_hidden_state)
    assert torch.allclose(out.logits, expected_logits, atol=1e-5)
    expected_loss = nn.CrossEntropyLoss()(expected_logits.view(-1, V), labels.view(-1))
    assert abs(float(out.loss.detach()) - float(expected_loss.detach())) < 1e-5
    # the decoder weight is the embedding matrix itself; the state dict holds the bias once
    assert ours.decoder.weight is embedding.weight
    assert "decoder.bias" not in dict(ours.named_parameters())
    assert set(ours.hf_config()) >= {"vocab_size", "layer_norm_eps", "tie_word_embeddings"}
    assert float(ours(enc, {"labels": torch.full((3, 7), -100)}).loss) == 0.0  # HF: nan


def test_untied_lm_head_keeps_its_own_decoder():
    head = MaskedLMHead(input_dim=D, vocab_size=V, tie_word_embeddings=False)
    embedding = nn.Embedding(V, D)
    head.tie_input_embeddings(embedding)
    assert head.decoder.weight is not embedding.weight
    with pytest.raises(SpecError, match="vocab_size"):
        MaskedLMHead(input_dim=D, vocab_size=V + 1).tie_input_embeddings(embedding)
    with pytest.raises(SpecError, match="vocab_size"):
        MaskedLMHead(input_dim=D)


def test_masked_lm_fill_mask_and_metrics():
    head = MaskedLMHead(input_dim=D, vocab_size=V, top_k=3)
    mask_id = 4
    inputs = torch.tensor([[0, 4, 7, 4, 2], [0, 9, 4, 2, 1]])
    logits = torch.full((2, 5, V), -10.0)
    logits[0, 1, 11], logits[0, 1, 12], logits[0, 1, 13] = 5.0, 4.0, 3.0
    logits[0, 3, 20] = 6.0
    logits[1, 2, 30] = 7.0
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 3], labels[1, 2], labels[1, 1] = 11, 21, 30, 9
    out = HeadOutput(logits=logits)
    batch = {"inputs": inputs, "labels": labels, "mask_token_id": mask_id}
    pred = head.predict(out, batch)
    assert [e["position"] for e in pred[0]] == [1, 3] and [e["position"] for e in pred[1]] == [2]
    assert pred[0][0]["token_ids"] == [11, 12, 13]
    probs = logits[0, 1].softmax(-1)
    assert pred[0][0]["scores"] == pytest.approx([float(probs[11]), float(probs[12]), float(probs[13])])
    assert pred[1][0]["token_ids"][0] == 30
    assert head.references(batch) == [{1: 11, 3: 21}, {1: 9, 2: 30}]
    counts = head.eval_counts(out, batch)
    # correct at (0,1) and (1,2); wrong at (0,3) (20 vs 21) and (1,1) (argmax of a flat row is 0)
    assert counts["mlm_correct"] == 2 and counts["mlm_tokens"] == 4
    logp = logits.log_softmax(-1)
    nll = -(logp[0, 1, 11] + logp[0, 3, 21] + logp[1, 2, 30] + logp[1, 1, 9])
    metrics = head.summarize(counts)
    assert metrics["accuracy"] == 50.0
    assert metrics["perplexity"] == pytest.approx(math.exp(float(nll) / 4), rel=1e-5)
    with pytest.raises(SpecError, match="mask_token_id"):
        head.predict(out, {"inputs": inputs})


@torch.no_grad()
def test_causal_lm_loss_equals_hf_and_defaults_to_inputs():
    ours, hf, _ = lm_pair(CausalLMHead)
    enc = hidden(lengths=[7, 5, 2])
    g = torch.Generator().manual_seed(3)
    inputs = torch.randint(3, V, (3, 7), generator=g)
    labels = inputs.masked_fill(enc.padding_mask, -100)
    logits = hf(enc.last_hidden_state)
    expected = ForCausalLMLoss(logits, labels, V)
    out = ours(enc, {"labels": labels})
    assert torch.allclose(out.logits, logits, atol=1e-5)
    assert abs(float(out.loss) - float(expected)) < 1e-5
    # no labels in the batch: the inputs with padding ignored
    implicit = ours(enc, {"inputs": inputs, "padding_mask": enc.padding_mask})
    assert abs(float(implicit.loss) - float(expected)) < 1e-5
    # while generating (a cache in the batch) there is no loss
    assert ours(enc, {"inputs": inputs, "use_cache": True}).loss is None
    assert ours.hf_config()["is_decoder"] is True


def test_causal_lm_perplexity_counts_are_additive():
    head = CausalLMHead(input_dim=D, vocab_size=V)
    enc = hidden(batch=4, lengths=[7, 6, 3, 5])
    inputs = torch.randint(3, V, (4, 7), generator=torch.Generator().manual_seed(5))
    batch = {"inputs": inputs, "padding_mask": enc.padding_mask}
    whole = head.eval_counts(head(enc, batch), batch)
    parts = {}
    for rows in (slice(0, 1), slice(1, 4)):
        part = {"inputs": inputs[rows], "padding_mask": enc.padding_mask[rows]}
        sub = EncoderOutput(last_hidden_state=enc.last_hidden_state[rows], padding_mask=enc.padding_mask[rows])
        for k, v in head.eval_counts(head(sub, part), part).items():
            parts[k] = parts.get(k, 0.0) + v
    assert whole["lm_tokens"] == 6 + 5 + 2 + 4
    assert head.summarize(parts)["perplexity"] == pytest.approx(head.summarize(whole)["perplexity"], rel=1e-5)
    loss = float(head(enc, batch).loss.detach())
    assert head.summarize(whole)["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda x: torch.isfinite(x[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.7)) == [0, 1]      # 0.5 + 0.2 reaches 0.7
    assert kept(filter_logits(logits, top_p=0.71)) == [0, 1, 2]
    assert kept(filter_logits(logits, top_p=0.1)) == [0]         # the best token always stays
    assert kept(filter_logits(logits, top_k=4, top_p=0.9)) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- generation


class TinyCache:
    """Keys and values of the past tokens (the shape of a cache object: ``get_seq_length``)."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    def get_seq_length(self) -> int:
        return self.keys.shape[1]


class TinyEmbeddings(FeatureExtractor):
    batch_keys = ("position_ids", "past_key_values")

    def __init__(self, vocab=V, dim=D, padding_idx=1):
        super().__init__()
        self.dim, self.vocab_size, self.padding_idx = dim, vocab, padding_idx
        self.word = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.position = nn.Embedding(64, dim)

    def input_embeddings(self):
        return self.word

    def forward(self, inputs, padding_mask=None, position_ids=None, past_key_values=None):
        if position_ids is None:  # padding-aware positions of the new tokens, after the past
            past = 0 if past_key_values is None else past_key_values.get_seq_length()
            real = (inputs != self.padding_idx).long()
            position_ids = (real.cumsum(-1) + past) * real + self.padding_idx
        return FeatureExtractorOutput(features=self.word(inputs) + self.position(position_ids),
                                      padding_mask=padding_mask)


class TinyDecoder(Encoder):
    """One causal self-attention block with a key/value cache; ``padding_mask`` covers past + new."""

    batch_keys = ("past_key_values", "use_cache")

    def __init__(self, dim=D):
        super().__init__()
        self.dim, self.num_layers = dim, 1
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def embed(self, features, padding_mask=None, mask=None):
        return features

    def contextualize(self, x, padding_mask=None, *, past_key_values=None, use_cache=False, **unused):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        past = 0
        if past_key_values is not None:
            past = past_key_values.get_seq_length()
            k, v = torch.cat([past_key_values.keys, k], 1), torch.cat([past_key_values.values, v], 1)
        total, new = k.shape[1], x.shape[1]
        allowed = torch.arange(total)[None, :] <= (past + torch.arange(new))[:, None]
        allowed = allowed[None].expand(x.shape[0], new, total)
        if padding_mask is not None:
            allowed = allowed & ~padding_mask[:, None, -total:]
        scores = (q @ k.transpose(1, 2) / math.sqrt(self.dim)).masked_fill(~allowed, -1e9)
        h = x + scores.softmax(-1) @ v
        h = h + self.ffn(h)
        return EncoderOutput(last_hidden_state=h, padding_mask=None if padding_mask is None else padding_mask[:, -new:],
                             past_key_values=TinyCache(k, v) if use_cache else None)


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    model = TaskModel(TinyEmbeddings(), TinyDecoder(), CausalLMHead(input_dim=D, vocab_size=V))
    with torch.no_grad():
        model.head.bias.normal_(0, 2.0)  # varied continuations
    return model.eval()


PROMPTS = [[0, 5, 9, 12, 7], [0, 22], [0, 31, 8]]


def padded(prompts, side, pad=1):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        where = slice(0, len(p)) if side == "right" else slice(width - len(p), width)
        ids[i, where], mask[i, where] = torch.tensor(p), 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_greedy_generation_equals_recomputation_and_unpadded_rows(side):
    model = tiny_lm()
    ids, mask = padded(PROMPTS, side)
    cached = generate(model, ids, mask, max_new_tokens=6)
    full = generate(model, ids, mask, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, full)
    new = cached[:, ids.shape[1]:]
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=6)
        assert new[row].tolist() == alone[0, len(prompt):].tolist()
    # the generated tokens are the argmax of a full forward over the unpadded sequence
    seq = torch.tensor([PROMPTS[0] + new[0].tolist()])
    logits = model({"inputs": seq, "padding_mask": torch.zeros_like(seq, dtype=torch.bool), "labels": seq}).logits
    assert logits[0, len(PROMPTS[0]) - 1: -1].argmax(-1).tolist() == new[0].tolist()


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = tiny_lm(seed=1)
    ids, mask = padded(PROMPTS, "left")
    greedy = generate(model, ids, mask, max_new_tokens=5)
    top1 = generate(model, ids, mask, max_new_tokens=5, strategy="sample", top_k=1,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)
    draws = [generate(model, ids, mask, max_new_tokens=5, strategy="sample", top_p=0.9, temperature=1.5,
                      generator=torch.Generator().manual_seed(7), use_cache=c) for c in (True, False)]
    assert torch.equal(draws[0], draws[1])


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = tiny_lm()
    ids, mask = padded(PROMPTS, "left")
    free = generate(model, ids, mask, max_new_tokens=6)
    eos = int(free[0, ids.shape[1]])  # row 0's first new token
    out = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos)
    assert out[0, ids.shape[1]] == eos and (out[0, ids.shape[1] + 1:] == 1).all()
    for row in range(1, 3):
        generated = free[row, ids.shape[1]:].tolist()
        if eos not in generated:
            assert out[row, ids.shape[1]:].tolist() == generated[: out.shape[1] - ids.shape[1]]


class HFWordEmbeddings(FeatureExtractor):
    """Adapter: the word-embedding lookup of a Hugging Face ``Data2VecTextModel``."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        self.dim, self.vocab_size = hf_model.config.hidden_size, hf_model.config.vocab_size
        self.padding_idx = hf_model.config.pad_token_id

    def input_embeddings(self):
        return self.hf.embeddings.word_embeddings

    def forward(self, inputs, padding_mask=None):
        return FeatureExtractorOutput(features=self.hf.embeddings.word_embeddings(inputs), padding_mask=padding_mask)


class HFDecoder(Encoder):
    """Adapter: the rest of a Hugging Face decoder (positions, layers, its own cache object)."""

    batch_keys = ("position_ids", "past_key_values", "use_cache")

    def __init__(self, hf_model):
        super().__init__()
        self.hf, self.dim, self.num_layers = hf_model, hf_model.config.hidden_size, 1

    def embed(self, features, padding_mask=None, mask=None):
        return features

    def contextualize(self, x, padding_mask=None, *, position_ids=None, past_key_values=None, use_cache=False, **_):
        attention = None if padding_mask is None else (~padding_mask).long()
        out = self.hf(inputs_embeds=x, attention_mask=attention, position_ids=position_ids,
                      past_key_values=past_key_values, use_cache=bool(use_cache))
        return EncoderOutput(last_hidden_state=out.last_hidden_state,
                             padding_mask=None if padding_mask is None else padding_mask[:, -x.shape[1]:],
                             past_key_values=out.past_key_values if use_cache else None)


def hf_causal_lm():
    torch.manual_seed(0)
    config = hf_config(is_decoder=True, num_hidden_layers=2, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    hf = transformers.Data2VecTextForCausalLM(config).eval()
    with torch.no_grad():  # varied continuations that never pick <pad>
        hf.data2vec_text.embeddings.word_embeddings.weight.normal_(0, 1.0)
        hf.data2vec_text.embeddings.position_embeddings.weight.normal_(0, 1.0)
        hf.lm_head.bias.normal_(0, 0.5)
        hf.lm_head.bias[1] = -10.0
    head = CausalLMHead(input_dim=D, vocab_size=V)
    model = TaskModel(HFWordEmbeddings(hf.data2vec_text), HFDecoder(hf.data2vec_text), head).eval()
    head.load_state_dict({k: v for k, v in hf.lm_head.state_dict().items() if k != "decoder.bias"}, strict=False)
    assert head.decoder.weight is hf.data2vec_text.embeddings.word_embeddings.weight
    return model, hf


@pytest.mark.parametrize("side", ["left", "right"])
def test_generation_with_hugging_face_decoder_and_cache_equals_hf_generate(side):
    """The same loop on a real HF decoder (its DynamicCache, SDPA masks): padded batches decode
    like each prompt alone, and like HF's own greedy ``generate`` given RoBERTa position ids."""
    model, hf = hf_causal_lm()
    ids, mask = padded(PROMPTS, side)
    cached = generate(model, ids, mask, max_new_tokens=5)
    assert torch.equal(cached, generate(model, ids, mask, max_new_tokens=5, use_cache=False))
    for row, prompt in enumerate(PROMPTS):
        prompt_ids = torch.tensor([prompt])
        # HF generate counts positions from 0 unless told; data2vec-text was trained from padding_idx + 1
        positions = torch.arange(len(prompt))[None] + 2
        expected = hf.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), position_ids=positions,
                               max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=1)
        assert cached[row, ids.shape[1]:].tolist() == expected[0, len(prompt):].tolist()
    assert len(set(cached[:, ids.shape[1]:].flatten().tolist())) > 3  # not a degenerate repetition


def test_causal_lm_training_lowers_perplexity():
    model = tiny_lm().train()
    text = torch.tensor([[0, 5, 6, 7, 8, 9, 10, 11, 2], [0, 12, 13, 14, 15, 2, 1, 1, 1]])
    batch = {"inputs": text, "padding_mask": text == 1}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        out = model(batch)
    metrics = model.head.summarize(model.head.eval_counts(out.head_output, batch))
    # every next token is learnt except the one after <s>, where the two texts differ (12 of 13)
    assert losses[-1] < 0.2 * losses[0] and metrics["next_token_accuracy"] == pytest.approx(100 * 12 / 13)
    assert metrics["perplexity"] < 1.5


def test_position_ids_skip_padding_anywhere():
    padding = torch.tensor([[True, False, False, True, False]])
    assert position_ids_for(padding, 1).tolist() == [[1, 2, 3, 1, 4]]


# --------------------------------------------------------------------------- sequence classification


def classification_pair(num_labels, **kwargs):
    torch.manual_seed(0)
    hf = Data2VecTextClassificationHead(hf_config(num_labels=num_labels)).eval()
    ours = TextClassificationHead(input_dim=D, num_labels=num_labels, **kwargs).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items()}, strict=False)
    return ours, hf


@torch.no_grad()
@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification", "regression"])
def test_sequence_classification_losses_equal_hf(problem):
    num_labels = 1 if problem == "regression" else 3
    ours, hf = classification_pair(num_labels)
    enc = hidden()
    g = torch.Generator().manual_seed(2)
    if problem == "single_label_classification":
        labels, loss_fn = torch.tensor([0, 2, 1]), nn.CrossEntropyLoss()
    elif problem == "multi_label_classification":
        labels, loss_fn = (torch.rand(3, 3, generator=g) > 0.5).float(), nn.BCEWithLogitsLoss()
    else:
        labels, loss_fn = torch.randn(3, generator=g), nn.MSELoss()
    out = ours(enc, {"labels": labels})
    expected_logits = hf(enc.last_hidden_state)
    assert torch.allclose(out.logits, expected_logits, atol=1e-6)
    if problem == "regression":
        expected = loss_fn(expected_logits.squeeze(), labels.squeeze())
    elif problem == "single_label_classification":
        expected = loss_fn(expected_logits.view(-1, 3), labels.view(-1))
    else:
        expected = loss_fn(expected_logits, labels)
    assert abs(float(out.loss) - float(expected)) < 1e-6
    assert ours.problem_type == problem  # inferred from the labels as HF does
    assert ours.hf_config()["problem_type"] == problem


def test_sequence_classification_predictions_and_metrics():
    head = TextClassificationHead(input_dim=D, label_names=["neg", "pos"])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    out = HeadOutput(logits=logits)
    batch = {"labels": labels}
    assert head.predict(out, batch) == ["neg", "pos", "pos", "neg"]
    assert head.references(batch) == ["neg", "pos", "neg", "pos"]
    metrics = head.summarize(head.eval_counts(out, batch))
    # TP=1 FP=1 FN=1 TN=1: accuracy 50, F1 50, MCC 0
    assert metrics["accuracy"] == 50.0 and metrics["f1"] == pytest.approx(50.0) and metrics["mcc"] == 0.0
    assert head.hf_config()["id2label"] == {"0": "neg", "1": "pos"}

    reg = TextClassificationHead(input_dim=D, num_labels=1)
    preds, targets = torch.tensor([[0.1], [0.4], [0.35], [0.8]]), torch.tensor([0.0, 1.0, 2.0, 3.0])
    counts = reg.eval_counts(HeadOutput(logits=preds), {"labels": targets})
    m = reg.summarize(counts)
    assert m["spearman"] == pytest.approx(80.0)  # ranks 1,3,2,4 vs 1,2,3,4: rho = 1 - 6*2/(4*15)
    assert reg.predict(HeadOutput(logits=preds), {}) == pytest.approx([0.1, 0.4, 0.35, 0.8])

    multi = TextClassificationHead(input_dim=D, label_names=["a", "b", "c"], problem_type="multi_label_classification")
    logits = torch.tensor([[1.0, -1.0, 2.0], [-1.0, -1.0, 1.0]])
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert multi.predict(HeadOutput(logits=logits), {}) == [["a", "c"], ["c"]]
    m = multi.summarize(multi.eval_counts(HeadOutput(logits=logits), {"labels": target}))
    assert m["subset_accuracy"] == 50.0 and m["micro_f1"] == pytest.approx(100 * 2 * 3 / (2 * 3 + 0 + 1))
    with pytest.raises(SpecError, match="problem_type"):
        TextClassificationHead(input_dim=D, num_labels=2, problem_type="ranking")
    with pytest.raises(SpecError, match="num_labels"):
        TextClassificationHead(input_dim=D)


# --------------------------------------------------------------------------- multiple choice


@torch.no_grad()
def test_multiple_choice_folds_choices_and_scores_with_ce():
    head = MultipleChoiceHead(input_dim=D).eval()
    batch = {"inputs": torch.randint(0, V, (2, 4, 5)), "padding_mask": torch.zeros(2, 4, 5, dtype=torch.bool),
             "token_type_ids": torch.zeros(2, 4, 5, dtype=torch.long), "labels": torch.tensor([3, 1])}
    folded = head.prepare_batch(batch)
    assert folded["inputs"].shape == (8, 5) and folded["num_choices"] == 4
    assert torch.equal(folded["inputs"][5], batch["inputs"][1, 1])
    assert folded["token_type_ids"].shape == (8, 5) and batch["inputs"].shape == (2, 4, 5)
    pooled = torch.randn(8, D, generator=torch.Generator().manual_seed(0))
    out = head(EncoderOutput(last_hidden_state=torch.zeros(8, 5, D), pooler_output=pooled), folded)
    expected_logits = (pooled @ head.classifier.weight.T + head.classifier.bias).view(2, 4)
    assert torch.allclose(out.logits, expected_logits, atol=1e-6)
    assert float(out.loss) == pytest.approx(float(nn.CrossEntropyLoss()(expected_logits, batch["labels"])), abs=1e-6)
    counts = head.eval_counts(out, batch)
    assert head.summarize(counts)["accuracy"] == 50.0 * float((expected_logits.argmax(-1) == batch["labels"]).sum())
    with pytest.raises(SpecError, match="add_pooling_layer: true"):
        head(EncoderOutput(last_hidden_state=torch.zeros(8, 5, D)), folded)


# --------------------------------------------------------------------------- token classification

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@torch.no_grad()
def test_token_classification_loss_and_word_level_entities():
    head = TokenClassificationHead(input_dim=D, label_names=TAGS).eval()
    enc = hidden(batch=2, length=8)
    labels = torch.full((2, 8), -100)
    labels[0, [1, 3, 4, 6]] = torch.tensor([1, 2, 0, 3])
    labels[1, [1, 2]] = torch.tensor([3, 4])
    out = head(enc, {"labels": labels})
    expected = nn.CrossEntropyLoss()(out.logits.view(-1, 5), labels.view(-1))
    assert float(out.loss) == pytest.approx(float(expected), abs=1e-6)

    # sentence 0: "John" is two sub-tokens (1, 2); the other words one each
    word_ids = [[None, 0, 0, 1, 2, 3, 4, None], [None, 0, 1, None, None, None, None, None]]
    words = [["John", "Smith", "went", "to", "Paris"], ["New", "York"]]
    word_labels = [["B-PER", "I-PER", "O", "O", "B-LOC"], ["B-LOC", "I-LOC"]]
    wanted = {(0, 1): 1, (0, 2): 4, (0, 3): 2, (0, 4): 0, (0, 5): 0, (0, 6): 3, (1, 1): 3, (1, 2): 3}
    logits = torch.zeros(2, 8, 5)
    for (b, t), tag in wanted.items():
        logits[b, t, tag] = 5.0
    batch = {"labels": labels, "word_ids": word_ids, "words": words, "word_labels": word_labels}
    pred = head.predict(HeadOutput(logits=logits), batch)
    # the second sub-token of "John" (I-LOC) is ignored: words follow their first sub-token
    assert pred == [["B-PER", "I-PER", "O", "O", "B-LOC"], ["B-LOC", "B-LOC"]]
    counts = head.eval_counts(HeadOutput(logits=logits), batch)
    # gold: PER(0,1) LOC(4,4) | LOC(0,1); predicted: PER(0,1) LOC(4,4) | LOC(0,0) LOC(1,1)
    assert (counts["ent_correct"], counts["ent_pred"], counts["ent_gold"]) == (2, 4, 3)
    m = head.summarize(counts)
    assert m["precision"] == 50.0 and m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(100 * 2 * 2 / (4 + 3))
    assert m["accuracy"] == pytest.approx(100 * 6 / 7)
    assert head.hf_config()["label2id"]["B-LOC"] == 3
    # references fall back to the first-sub-token labels when word labels are absent
    assert head.references({"labels": labels, "word_ids": word_ids, "words": words}) == word_labels


def test_truncated_words_count_as_missed_entities():
    head = TokenClassificationHead(input_dim=D, label_names=TAGS)
    logits = torch.zeros(1, 3, 5)
    logits[0, 1, 1] = 5.0
    batch = {"word_ids": [[None, 0, None]], "words": [["Ann", "Paris"]], "word_labels": [["B-PER", "B-LOC"]]}
    assert head.predict(HeadOutput(logits=logits), batch) == [["B-PER", "O"]]
    counts = head.eval_counts(HeadOutput(logits=logits), batch)
    assert (counts["ent_correct"], counts["ent_pred"], counts["ent_gold"]) == (1, 1, 2)


def test_entity_chunking_hand_examples():
    # IOB2, IOB1 (I- starts a chunk after O; B- splits adjacent chunks), type changes, IOBES
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert get_entities(["I-PER", "I-PER", "B-PER", "O"]) == [("PER", 0, 1), ("PER", 2, 2)]
    assert get_entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert get_entities(["S-PER", "B-LOC", "E-LOC", "E-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2), ("LOC", 3, 3)]
    assert entity_scores(entity_counts(["O"], ["O"])) == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                            "accuracy": 100.0}


# --------------------------------------------------------------------------- question answering


@torch.no_grad()
def test_qa_loss_equals_hf_with_out_of_range_positions():
    head = QuestionAnsweringHead(input_dim=D)
    enc = hidden(length=6)
    start, end = torch.tensor([2, 0, 9]), torch.tensor([3, 0, 11])  # the last is outside: ignored
    out = head(enc, {"start_positions": start, "end_positions": end})
    s, e = out.extras["start_logits"], out.extras["end_logits"]
    assert torch.equal(out.logits[..., 0], s) and s.shape == (3, 6)
    ce = nn.CrossEntropyLoss(ignore_index=6)
    expected = (ce(s, start.clamp(0, 6)) + ce(e, end.clamp(0, 6))) / 2
    assert float(out.loss) == pytest.approx(float(expected), abs=1e-6)
    assert head(enc, {}).loss is None


def qa_windows(context, answer_start, answer_end, window_chars=(0, 30, 60), width=40):
    """Windows over ``context`` tokenised one character per token: ``[<s>, q, </s>, chars...]``."""
    rows = []
    for begin in window_chars:
        chars = list(range(begin, min(begin + width, len(context))))
        offsets = [None, None, None] + [(c, c + 1) for c in chars]
        start = torch.full((len(offsets) + 2,), -1.0)  # two padding positions with large logits
        end = torch.full((len(offsets) + 2,), -1.0)
        start[-2:], end[-2:] = 50.0, 50.0
        if begin <= answer_start and answer_end < begin + width:
            start[3 + answer_start - begin], end[3 + answer_end - begin] = 4.0, 3.0
        rows.append((start.tolist(), end.tolist(), offsets))
    return rows


def test_n_best_extraction_finds_the_planted_answer_across_windows():
    context = "The quick brown fox jumps over the lazy dog near the old river bank today."
    text = "lazy dog"
    begin = context.index(text)
    windows = qa_windows(context, begin, begin + len(text) - 1)
    assert best_answer(windows, context)["text"] == text
    # an answer longer than max_answer_length tokens is not allowed
    assert best_answer(windows, context, max_answer_length=3)["text"] != text
    # SQuAD v2: a strong null score wins unless the threshold is raised
    for start, end, _ in windows:
        start[0], end[0] = 6.0, 6.0
    assert best_answer(windows, context, version_2_with_negative=True)["text"] == ""
    assert best_answer(windows, context, version_2_with_negative=True, null_score_diff_threshold=6.0)["text"] == text


def test_qa_predict_groups_windows_and_scores_squad():
    head = QuestionAnsweringHead(input_dim=D, version_2_with_negative=True)
    context = "Paris is the capital of France."
    rows = [[None, None, (0, 5), (6, 8), (9, 12), (13, 20), (21, 23), (24, 30)],
            [None, None, (13, 20), (21, 23), (24, 30)]]
    logits = torch.zeros(4, 8, 2)
    logits[0, 2, 0], logits[0, 2, 1] = 5.0, 5.0          # q1 window 1: "Paris"
    logits[1, 4, 0], logits[1, 4, 1] = 9.0, 9.0          # q1 window 2: "France" (better)
    logits[2, 0] = 8.0                                   # q2: null wins
    logits[3, 2, 0], logits[3, 4, 1] = 3.0, 3.0          # q3: "capital of France"
    batch = {"example_ids": ["q1", "q1", "q2", "q3"], "offsets": [rows[0], rows[1], rows[0], rows[1]],
             "contexts": [context] * 4, "answers": [["France"], ["France"], [], ["the capital", "capital"]]}
    out = HeadOutput(logits=logits)
    assert head.predict(out, batch) == ["France", "", "capital of France"]
    assert head.references(batch) == [["France"], [], ["the capital", "capital"]]
    metrics = head.summarize(head.eval_counts(out, batch))
    # q3: "capital of france" vs "capital": precision 1/3, recall 1, F1 = 1/2; vs "the capital" -> "capital"
    # (the article is normalised away) the same, so its best F1 is 1/2 and it is not an exact match
    assert metrics["exact"] == pytest.approx(200 / 3)
    assert metrics["f1"] == pytest.approx(100 * (1 + 1 + 1 / 2) / 3)
    assert metrics["HasAns_exact"] == 50.0 and metrics["NoAns_exact"] == 100.0


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Eiffel-Tower, an icon!") == "eiffeltower icon"
    assert f1_score("a cat sat", "the cat") == pytest.approx(2 * (1 * 0.5) / 1.5)
    assert f1_score("", "") == 1.0 and f1_score("an", "") == 1.0  # both normalise to nothing
    counts = squad_counts([["Denver Broncos", "Broncos"], []], ["broncos", "something"])
    assert squad_summary(counts) == {"exact": 50.0, "f1": 50.0, "HasAns_exact": 100.0, "HasAns_f1": 100.0,
                                     "NoAns_exact": 0.0, "NoAns_f1": 0.0}


# --------------------------------------------------------------------------- real processor batches

DEMO = __import__("pathlib").Path(__file__).resolve().parents[2] / "experiments" / "data" / "text_demo"


def test_heads_read_text_processor_batches_qa_and_ner():
    """Planting the processor's own gold positions in the logits gives perfect scores: the heads
    and the processor agree on offsets, windows, example ids and word alignment."""
    from d2v_text.datasets import CoNLL, SquadJSON
    from d2v_text.processor import TextProcessor

    proc = TextProcessor(tokenizer=str(DEMO / "tokenizer"), max_length=40, stride=8)
    squad = SquadJSON(str(DEMO / "squad" / "dev-v1.1.json"))
    examples = [proc.load(squad[i], train=False) for i in range(4)]
    batch = proc.collate(examples)
    assert len(batch["example_ids"]) > 4  # several windows per question
    logits = torch.zeros(*batch["inputs"].shape, 2)
    rows = torch.arange(logits.shape[0])
    logits[rows, batch["start_positions"], 0] = 10.0
    logits[rows, batch["end_positions"], 1] = 10.0
    head = QuestionAnsweringHead(input_dim=D)
    out = HeadOutput(logits=logits)
    predictions = head.predict(out, batch)
    assert len(predictions) == len(batch["ids"]) == 4
    metrics = head.summarize(head.eval_counts(out, batch))
    assert metrics["exact"] == 100.0 and metrics["f1"] == 100.0

    conll = CoNLL(str(DEMO / "conll" / "valid.txt"))
    proc = TextProcessor(tokenizer=str(DEMO / "tokenizer"), max_length=64)
    batch = proc.collate([proc.load(conll[i], train=False) for i in range(6)])
    labels = batch["labels"]
    logits = torch.zeros(*labels.shape, len(conll.label_names))
    logits.scatter_(-1, labels.clamp(min=0)[..., None], 10.0)
    ner = TokenClassificationHead(input_dim=D, label_names=conll.label_names)
    out = HeadOutput(logits=logits)
    assert ner.predict(out, batch) == batch["word_labels"]
    metrics = ner.summarize(ner.eval_counts(out, batch))
    assert metrics["f1"] == 100.0 and metrics["accuracy"] == 100.0 and metrics["token_accuracy"] == 100.0


@pytest.mark.parametrize("node", [
    {"name": "masked_lm", "top_k": 3},
    {"name": "causal_lm"},
    {"name": "text_classification", "label_names": ["a", "b"]},
    {"name": "multiple_choice"},
    {"name": "token_classification", "label_names": TAGS},
    {"name": "question_answering", "version_2_with_negative": True},
])
def test_heads_build_from_specs_with_injected_sizes(node):
    """Every head registers under its name and takes what build_model injects (input_dim,
    vocab_size, num_layers) without the spec naming it; a typo is a spec error."""
    from d2v.api import plugins
    from d2v.spec.model import build_component

    registry = plugins.registry()
    head = build_component(registry, "head", dict(node), "model.head", input_dim=D, vocab_size=V, num_layers=2)
    assert isinstance(head.hf_config(), dict)
    with pytest.raises(SpecError):
        build_component(registry, "head", {**node, "typo_setting": 1}, "model.head", input_dim=D, vocab_size=V)


# --------------------------------------------------------------------------- the d2v text model


def tiny_text_model(head, **encoder):
    from d2v.api import plugins
    from d2v.spec.model import build_model

    torch.manual_seed(0)
    spec = {"preset": "data2vec-text-tiny", "encoder": encoder, "head": head}
    return build_model(spec, plugins.registry(), "finetune")


@pytest.mark.parametrize("side", ["left", "right"])
def test_generation_with_the_d2v_text_decoder(side):
    """``text.transformer`` with ``is_decoder``: its KeyValueCache decodes padded prompts exactly
    as full recomputation and as each prompt alone."""
    model = tiny_text_model({"name": "causal_lm"}, is_decoder=True).eval()
    assert model.head.decoder.weight is model.feature_extractor.word_embeddings.weight
    with torch.no_grad():  # varied continuations that never pick <pad>
        model.feature_extractor.word_embeddings.weight.normal_(0, 1.0)
        model.feature_extractor.position_embeddings.weight.normal_(0, 1.0)
        model.head.bias.normal_(0, 0.5)
        model.head.bias[1] = -10.0
    ids, mask = padded(PROMPTS, side)
    cached = generate(model, ids, mask, max_new_tokens=6)
    assert torch.equal(cached, generate(model, ids, mask, max_new_tokens=6, use_cache=False))
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=6)
        assert cached[row, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist()
    assert len(set(cached[:, ids.shape[1]:].flatten().tolist())) > 6


def test_every_head_trains_on_text_processor_batches():
    """Each head on the tiny d2v text model and a real processor batch: finite loss that a few
    optimizer steps lower, predictions and metrics for every example."""
    from d2v.ssl.masking import BertMask
    from d2v_text.datasets import CoNLL, GlueTSV, SquadJSON, SwagCSV, TextLines
    from d2v_text.processor import TextProcessor

    vocab = str(DEMO / "tokenizer")
    plain = TextProcessor(tokenizer=vocab, max_length=48, stride=16)
    masking = TextProcessor(tokenizer=vocab, max_length=48, masking=BertMask(mask_prob=0.3))
    lines = TextLines(str(DEMO / "lm" / "valid.txt"))
    conll = CoNLL(str(DEMO / "conll" / "valid.txt"))
    rng = __import__("numpy").random.default_rng(0)
    cases = [
        ({"name": "masked_lm"}, {}, masking, [masking.load(lines[i], train=True, rng=rng) for i in range(6)]),
        ({"name": "causal_lm"}, {"is_decoder": True}, plain, [plain.load(lines[i], train=True) for i in range(6)]),
        ({"name": "text_classification", "num_labels": 2}, {}, plain,
         [plain.load(GlueTSV(str(DEMO), task="sst2", split="dev")[i], train=True) for i in range(6)]),
        ({"name": "multiple_choice"}, {"add_pooling_layer": True}, plain,
         [plain.load(SwagCSV(str(DEMO / "swag" / "val.csv"))[i], train=True) for i in range(4)]),
        ({"name": "token_classification", "label_names": conll.label_names}, {}, plain,
         [plain.load(conll[i], train=True) for i in range(6)]),
        ({"name": "question_answering"}, {}, plain,
         [plain.load(SquadJSON(str(DEMO / "squad" / "dev-v1.1.json"))[i], train=True) for i in range(3)]),
    ]
    for head, encoder, proc, examples in cases:
        model = tiny_text_model(head, dropout=0.0, **encoder)
        batch = proc.collate(examples)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(8):
            loss = model(batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert math.isfinite(losses[0]) and losses[-1] < losses[0], (head["name"], losses)
        model.eval()
        with torch.no_grad():
            out = model(batch)
        assert len(model.head.predict(out.head_output, batch)) == len(batch["ids"]), head["name"]
        assert model.head.summarize(model.head.eval_counts(out.head_output, batch)), head["name"]
