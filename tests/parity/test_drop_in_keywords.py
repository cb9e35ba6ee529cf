"""The models of ``d2v.from_pretrained`` take exactly the keywords of their transformers class.

For each of the 15 transformers ``Data2Vec*`` model classes, a tiny random model is saved by
``transformers`` and loaded with ``d2v.from_pretrained``. Every keyword the transformers class
takes (its forward's parameters, ``TransformersKwargs`` and ``return_dict``), given a value other
than its default, must either give transformers' outputs (same fields, atol 1e-5, fp32, eval,
padded batches) or be a TypeError naming it and saying that d2v's drop-in does not support it.
A misspelt keyword is Python's TypeError (with a did-you-mean); every keyword at its default value
(as pipelines pass them: ``output_attentions=False``, ``head_mask=None``, ``return_dict=True``)
is accepted and changes nothing; positional arguments bind in transformers' order.
"""

from __future__ import annotations

import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from audio_batches import padded_batch as audio_batch
from max_diff import MaxDiff

import d2v

transformers = pytest.importorskip("transformers")
from transformers.utils.generic import TransformersKwargs  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
MAX_DIFF = MaxDiff(ATOL)
#: per class: the keywords given with parity, and those refused
OUTCOME: dict[str, dict[str, list[str]]] = {}

AUDIO = ["Data2VecAudioModel", "Data2VecAudioForCTC", "Data2VecAudioForSequenceClassification",
         "Data2VecAudioForAudioFrameClassification", "Data2VecAudioForXVector"]
TEXT = ["Data2VecTextModel", "Data2VecTextForCausalLM", "Data2VecTextForMaskedLM",
        "Data2VecTextForSequenceClassification", "Data2VecTextForMultipleChoice",
        "Data2VecTextForTokenClassification", "Data2VecTextForQuestionAnswering"]
VISION = ["Data2VecVisionModel", "Data2VecVisionForImageClassification", "Data2VecVisionForSemanticSegmentation"]
CLASSES = AUDIO + TEXT + VISION

AUDIO_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    conv_dim=(16, 16, 24), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), conv_bias=True,
                    num_conv_pos_embeddings=2, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4,
                    vocab_size=12, num_labels=3, classifier_proj_size=12, tdnn_dim=(24, 24, 40),
                    tdnn_kernel=(5, 3, 1), tdnn_dilation=(1, 2, 1), xvector_output_dim=16)
PAD, VOCAB = 1, 97
TEXT_CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=48, max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-5,
                   pad_token_id=PAD, num_labels=3)
VISION_CONFIG = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                     image_size=16, patch_size=4, use_mask_token=True, use_relative_position_bias=True,
                     use_absolute_position_embeddings=True, out_indices=[1, 2, 3, 4], pool_scales=[1, 2],
                     auxiliary_channels=8, num_labels=5, drop_path_rate=0.0)
DECODER = {"is_decoder": True}
CROSS = {"is_decoder": True, "add_cross_attention": True}
#: text keywords that mean something only for a decoder (transformers ignores them otherwise)
TEXT_KEYWORD_CONFIG = {"encoder_hidden_states": CROSS, "encoder_attention_mask": CROSS, "cache": DECODER,
                       "use_cache": DECODER}


def hf_keywords(cls) -> list[str]:
    """What the transformers class takes: its forward's parameters (in order), then the keywords
    of ``**kwargs: TransformersKwargs`` and ``return_dict`` (its output decorators)."""
    params = [p.name for p in inspect.signature(cls.forward).parameters.values()
              if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [k for k in [*TransformersKwargs.__annotations__, "return_dict"] if k not in params]
    return params + extra


def hf_default(cls, name: str):
    param = inspect.signature(cls.forward).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


# --------------------------------------------------------------------------- models and inputs


def randomize(model):
    """Random values where transformers starts from constants, so every weight matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.uniform_(-0.2, 0.2)
            elif "norm" in name.lower() and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif any(k in name for k in ("relative_position_bias_table", "token", "position_embeddings", "lambda",
                                         "masked_spec_embed", "layer_weights")):
                param.normal_(0.0, 0.5)
    return model.eval()


def config_for(arch: str, overrides: dict):
    if arch in AUDIO:
        return transformers.Data2VecAudioConfig(**AUDIO_CONFIG, **overrides)
    if arch in TEXT:
        base = DECODER if arch == "Data2VecTextForCausalLM" else {}
        if arch == "Data2VecTextForQuestionAnswering":
            base = {"num_labels": 2}  # start and end logits
        return transformers.Data2VecTextConfig(**{**TEXT_CONFIG, **base, **overrides})
    return transformers.Data2VecVisionConfig(**VISION_CONFIG, **overrides)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``pair(arch, overrides)``: ``(transformers model, d2v drop-in)`` with the same weights."""
    built: dict = {}

    def load(arch: str, overrides: dict | None = None):
        key = (arch, tuple(sorted((overrides or {}).items())))
        if key not in built:
            torch.manual_seed(1)
            config = config_for(arch, overrides or {})
            config._attn_implementation = "sdpa"
            theirs = randomize(getattr(transformers, arch)(config))
            path = tmp_path_factory.mktemp(arch)
            theirs.save_pretrained(path)
            built[key] = theirs, d2v.from_pretrained(path)
        return built[key]

    return load


def text_batch(rows: int = 3, length: int = 9, lengths=(9, 6, 3)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = PAD
    return ids, mask


def base_inputs(arch: str, hf) -> dict:
    """The main input and ``attention_mask`` of a padded batch."""
    if arch in AUDIO:
        values, mask = audio_batch()
        return {"input_values": values, "attention_mask": mask}
    if arch in VISION:
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))}
    if arch == "Data2VecTextForMultipleChoice":
        ids, mask = text_batch(rows=6, lengths=(9, 6, 3, 8, 9, 5))
        return {"input_ids": ids.view(2, 3, -1), "attention_mask": mask.view(2, 3, -1)}
    ids, mask = text_batch()
    return {"input_ids": ids, "attention_mask": mask}


def labels_for(arch: str, hf, inputs: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    if arch in ("Data2VecAudioForSequenceClassification", "Data2VecAudioForXVector",
                "Data2VecTextForSequenceClassification"):
        return torch.tensor([2, 0, 1])
    if arch == "Data2VecAudioForCTC":
        labels = torch.randint(1, 12, (3, 5), generator=g)
        labels[2, 3:] = -100
        return labels
    if arch == "Data2VecAudioForAudioFrameClassification":
        with torch.no_grad():
            frames = hf(**inputs).logits.shape[1]
        return (torch.rand(3, frames, 3, generator=g) > 0.6).long()
    if arch == "Data2VecTextForMultipleChoice":
        return torch.tensor([2, 0])
    if arch in ("Data2VecTextForCausalLM", "Data2VecTextForMaskedLM", "Data2VecTextForTokenClassification"):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        labels = ids if arch != "Data2VecTextForTokenClassification" else torch.randint(0, 3, ids.shape, generator=g)
        return labels.masked_fill(mask == 0, -100)
    if arch == "Data2VecVisionForImageClassification":
        return torch.tensor([1, 4])
    labels = torch.randint(0, 5, (2, 16, 16), generator=g)
    labels[0, :3] = 255
    return labels


def calls(arch: str, name: str, hf, ours) -> tuple[dict, dict]:
    """``(transformers kwargs, d2v kwargs)``: the padded batch with ``name`` set to something
    other than its default (and what it needs beside it)."""
    inputs = base_inputs(arch, hf)
    main = next(iter(inputs))
    shape = inputs[main].shape
    g = torch.Generator().manual_seed(5)
    if name == "cache":  # a prompt, then one more token with each model's own cache
        ids, mask = text_batch(rows=2, length=6, lengths=(6, 6))
        with torch.no_grad():
            hf_cache = hf(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True).cache
            our_cache = ours(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True).cache
        step = {"input_ids": ids[:, 5:], "attention_mask": mask}
        return {**step, "cache": hf_cache}, {**step, "cache": our_cache}
    values = {
        "attention_mask": inputs.get("attention_mask"),
        "labels": None if name != "labels" else labels_for(arch, hf, inputs),
        "start_positions": torch.tensor([1, 0, 30]), "end_positions": torch.tensor([3, 4, 2]),
        "token_type_ids": torch.randint(0, 2, shape, generator=g) if main == "input_ids" else None,
        "position_ids": torch.arange(5, 5 + shape[-1]).expand(shape) if main == "input_ids" else torch.arange(4)[None],
        "inputs_embeds": torch.randn(*shape[:2], 32, generator=g),
        "encoder_hidden_states": torch.randn(3, 7, 32, generator=g),
        "encoder_attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1, 1] + [0] * 5]),
        "use_cache": False, "logits_to_keep": 1, "interpolate_pos_encoding": True,
        "output_hidden_states": True, "output_attentions": True, "return_dict": False,
        "num_items_in_batch": torch.tensor(7), "output_router_logits": True, "is_causal": True,
        "cu_seq_lens_q": torch.tensor([0, 9, 18]), "cu_seq_lens_k": torch.tensor([0, 9, 18]), "max_length_q": 9,
        "max_length_k": 9, "seq_idx": torch.zeros(1, 18, dtype=torch.long),
    }
    if name == "mask_time_indices":
        with torch.no_grad():
            frames = hf(**inputs).last_hidden_state.shape[1]
        values[name] = torch.rand(shape[0], frames, generator=g) < 0.3
    elif name == "bool_masked_pos":
        values[name] = torch.rand(shape[0], 16, generator=g) < 0.5
    if name not in values:
        raise AssertionError(f"no test value for {arch}.forward's keyword '{name}': add one")
    kwargs = {**inputs, name: values[name]}
    if name == "encoder_attention_mask":
        kwargs["encoder_hidden_states"] = values["encoder_hidden_states"]
    if name in ("start_positions", "end_positions"):  # the loss needs both
        kwargs.update(start_positions=values["start_positions"], end_positions=values["end_positions"])
    return kwargs, dict(kwargs)


# --------------------------------------------------------------------------- comparison


def assert_close(name: str, got, want) -> None:
    if hasattr(want, "get_seq_length"):  # caches: each model's own kind, of the same length
        assert got.get_seq_length() == want.get_seq_length(), name
        return
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), f"{name}: {len(got)} vs {len(want)} items"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(f"{name}[{i}]", a, b)
        return
    MAX_DIFF.check(name, got, want, record_as=name.split("[")[0])


def assert_same_outputs(label: str, got, want) -> None:
    """The same fields (transformers 5's ``cache`` is d2v's ``past_key_values``) with the same values;
    a tuple (``return_dict=False``) item by item in transformers' order."""
    if isinstance(want, tuple):
        assert_close(label, got, want)
        return
    names = ["past_key_values" if k == "cache" else k for k in want.keys()]
    assert list(got.keys()) == names, f"{label}: fields {list(got.keys())} vs transformers' {names}"
    for name, key in zip(names, want.keys()):
        assert_close(f"{label}.{name}", got[name], want[key])


def run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("arch", CLASSES)
def test_every_transformers_keyword_is_implemented_with_parity_or_refused(arch, pair):
    cls = getattr(transformers, arch)
    outcome = OUTCOME.setdefault(arch, {"implemented": [], "refused": []})
    for name in hf_keywords(cls):
        if name == next(iter(base_inputs(arch, None))):
            continue  # the main input is in every call
        overrides = TEXT_KEYWORD_CONFIG.get(name, {}) if arch in TEXT else {}
        hf, ours = pair(arch, overrides)
        hf_kwargs, our_kwargs = calls(arch, name, hf, ours)
        try:
            got = run(ours, our_kwargs)
        except TypeError as exc:
            message = str(exc)
            assert f"{name}=" in message and "not supported by d2v's drop-in" in message, message
            outcome["refused"].append(name)
            continue
        assert_same_outputs(f"{arch}({name})", got, run(hf, hf_kwargs))
        outcome["implemented"].append(name)


@pytest.mark.parametrize("arch", CLASSES)
def test_the_keyword_table_is_the_transformers_signature(arch, pair):
    """Positional arguments bind to ``hf_forward`` in order, so it must be transformers' order."""
    cls = getattr(transformers, arch)
    _, ours = pair(arch)
    params = [p for p in inspect.signature(cls.forward).parameters if p not in ("self", "kwargs")]
    assert list(ours.converter.hf_forward) == params


@pytest.mark.parametrize("arch", CLASSES)
def test_misspelt_and_unknown_keywords_are_type_errors(arch, pair):
    hf, ours = pair(arch)
    inputs = base_inputs(arch, hf)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'output_hidden_state'; "
                                        r"did you mean 'output_hidden_states'\?"):
        ours(**inputs, output_hidden_state=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'foo'$"):
        ours(**inputs, foo=None)
    with pytest.raises(TypeError, match="head_mask=a tensor of shape .* not supported by d2v's drop-in"):
        ours(**inputs, head_mask=torch.ones(2, 4))


@pytest.mark.parametrize("arch", CLASSES)
def test_defaults_are_accepted_and_change_nothing(arch, pair):
    cls = getattr(transformers, arch)
    hf, ours = pair(arch)
    inputs = base_inputs(arch, hf)
    main = next(iter(inputs))
    defaults = {name: hf_default(cls, name) for name in hf_keywords(cls) if name not in inputs}
    pipeline_style = {"output_attentions": False, "head_mask": None, "return_dict": True, "output_hidden_states": False}
    expected = run(hf, inputs)
    assert_same_outputs(f"{arch}(defaults)", run(ours, {**inputs, **defaults}), expected)
    assert_same_outputs(f"{arch}(pipeline)", run(ours, {**inputs, **pipeline_style}), expected)
    # positionally, in transformers' order
    params = list(ours.converter.hf_forward)
    args = [inputs.get(p) for p in params[:max(params.index(k) for k in inputs) + 1]]
    with torch.no_grad():
        assert_same_outputs(f"{arch}(positional)", ours(*args), hf(*args))
    with pytest.raises(TypeError, match=f"got multiple values for argument '{main}'"):
        ours(inputs[main], **inputs)


def test_report():
    """The keywords per class and the largest differences (run with -s to see them)."""
    for arch, outcome in OUTCOME.items():
        print(f"{arch}: implemented {', '.join(outcome['implemented'])}; refused {', '.join(outcome['refused'])}")
    MAX_DIFF.report("drop-in keyword parity")
