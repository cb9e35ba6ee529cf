"""One ``full_config`` rule for every modality (``d2v.interop.hf.full_config``), checked against
``transformers``' config classes: the written-out defaults are theirs, a null is kept exactly where
they keep (or fill) it and refused where they refuse it, and a ``config.json`` d2v exports reads
back in transformers with the values d2v reads from it."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from d2v.api.errors import SpecError  # noqa: E402
from d2v.interop.hf import full_config, get_converter, save_pretrained  # noqa: E402
from d2v_audio.hf import HF_DEFAULTS as AUDIO_DEFAULTS, audio_config  # noqa: E402
from d2v_text.hf import HF_DEFAULTS as TEXT_DEFAULTS  # noqa: E402
from d2v_vision.hf import HF_DEFAULTS as VISION_DEFAULTS  # noqa: E402

MODALITIES = {
    "text": (transformers.Data2VecTextConfig, lambda c: full_config(c, TEXT_DEFAULTS), TEXT_DEFAULTS),
    "audio": (transformers.Data2VecAudioConfig, audio_config, AUDIO_DEFAULTS),
    "vision": (transformers.Data2VecVisionConfig, lambda c: full_config(c, VISION_DEFAULTS), VISION_DEFAULTS),
}
#: what Data2VecAudioConfig derives from another field when given null (d2v reads None the same way)
FILLED = {"output_hidden_size": "hidden_size"}


def _fields(cls):
    return cls().to_dict()


@pytest.mark.parametrize("modality", sorted(MODALITIES))
def test_written_out_defaults_are_transformers_defaults(modality):
    cls, _, defaults = MODALITIES[modality]
    theirs = _fields(cls)
    for key, value in defaults.items():
        if key in FILLED:
            assert value is None and theirs[key] == theirs[FILLED[key]]
        elif key in theirs:
            assert theirs[key] == value, key
        else:  # not a config field: the model reads it with getattr and this default
            assert (modality, key) == ("audio", "apply_spec_augment")


@pytest.mark.parametrize("modality", sorted(MODALITIES))
def test_a_null_is_kept_where_transformers_keeps_it_and_refused_where_it_refuses_it(modality):
    cls, full, defaults = MODALITIES[modality]
    fields = _fields(cls)
    for key in defaults:
        try:
            theirs = cls(**{key: None}).to_dict().get(key) if key in fields else None
        except Exception:  # noqa: BLE001 -- transformers' strict type check
            with pytest.raises(SpecError, match=f"{key} to null"):
                full({key: None})
            continue
        ours = full({key: None})[key]
        assert ours is None, key
        assert theirs is None or theirs == fields[FILLED[key]], key
        assert full({})[key] == defaults[key]  # only a missing field takes the default


TINY = {
    "Data2VecTextForSequenceClassification": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=37,
                                                  max_position_embeddings=40, classifier_dropout=None,
                                                  id2label={0: "neg", 1: "pos"}),
    "Data2VecAudioForCTC": dict(vocab_size=12, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, conv_dim=[32, 32], conv_stride=[5, 2], conv_kernel=[10, 3],
                                num_conv_pos_embedding_groups=2, num_conv_pos_embeddings=2, conv_pos_kernel_size=3,
                                output_hidden_size=None),
    "Data2VecVisionForImageClassification": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=37, image_size=16, patch_size=4, num_labels=3),
}


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_an_export_reads_back_in_transformers_as_in_d2v(architecture, tmp_path):
    modality = {"Text": "text", "Audi": "audio", "Visi": "vision"}[architecture[8:12]]
    cls, full, defaults = MODALITIES[modality]
    converter = get_converter(architecture)
    config = {"architectures": [architecture], **TINY[architecture]}
    save_pretrained(converter.build(config), tmp_path, converter, config=config)
    written = json.loads((tmp_path / "config.json").read_text())
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(theirs) is cls
    ours = full(written)
    for key in defaults:
        expected = getattr(theirs, key, defaults[key])
        if key in FILLED and ours[key] is None:
            expected = None if expected == ours[FILLED[key]] else expected
        assert ours[key] == expected, key
    # and d2v reads its export as it read the config it came from
    where = {"_name_or_path": str(tmp_path)}
    assert converter.hf_config_to_spec({**written, **where}) == converter.hf_config_to_spec({**config, **where})
