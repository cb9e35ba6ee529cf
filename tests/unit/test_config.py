"""Spec loading, overrides and validation: errors name the key path, the line and a fix."""

import textwrap

import pytest

from d2v.spec.config import apply_override, load_spec, spec_from_dict, validate
from d2v.api.errors import SpecError


def _write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """\
    task: finetune
    model:
      preset: data2vec-audio-tiny
      head: {name: ctc}
    data:
      processor: {name: audio}
      train: {name: librispeech, root: /nowhere, splits: [train-demo]}
    optim: {name: adam, lr: 1.0e-4}
    schedule: {name: tri_stage}
    trainer: {max_steps: 10}
"""


def test_good_spec_validates(tmp_path):
    validate(load_spec(_write(tmp_path, GOOD)))


def test_a_head_made_for_another_modality_is_refused_naming_each_part(tmp_path):
    """An image head on a speech model (the registrations' `modalities`), before anything is built."""
    with pytest.raises(SpecError) as err:
        validate(load_spec(_write(tmp_path, GOOD.replace("head: {name: ctc}", "head: {name: image_classification}"))))
    message = str(err.value)
    assert ("spec.yaml:4: model.head: these parts work on different inputs (feature extractor 'audio.conv' (audio), "
            "head 'image_classification' (image), processor 'audio' (audio), dataset 'librispeech' (audio))") in message
    assert message.endswith("Heads for audio inputs: ctc.")
    # a head that declares no modality (a sequence classifier) fits any input, as do parts of plugins
    validate(load_spec(_write(tmp_path, GOOD.replace("head: {name: ctc}", "head: {name: audio_classification, num_labels: 2}"))))


def test_data_paths_are_checked_when_asked(tmp_path):
    spec = load_spec(_write(tmp_path, GOOD))
    validate(spec)  # what a run validates; the dataset itself reports missing data when it loads
    with pytest.raises(SpecError, match=r"spec.yaml:7: data.train.root: '/nowhere' does not exist \(looked at "
                                        r"/nowhere\); point it at the data, or check the spec away from its data "
                                        r"with `d2v check --no-data`."):
        validate(spec, check_data=True)
    (tmp_path / "corpus").mkdir()
    validate(load_spec(_write(tmp_path, GOOD.replace("/nowhere", str(tmp_path / "corpus")))), check_data=True)


def test_misspelled_parameter_names_path_line_and_suggestion(tmp_path):
    text = GOOD.replace("preset: data2vec-audio-tiny", "preset: data2vec-audio-tiny\n      encoder: {layrs: 2}")
    with pytest.raises(SpecError) as err:
        validate(load_spec(_write(tmp_path, text)))
    assert "spec.yaml:4: model.encoder.layrs: unknown parameter of encoder 'audio.transformer'; did you mean 'layers'?" in str(err.value)


def test_misspelled_component_name(tmp_path):
    with pytest.raises(SpecError, match=r"model.head.name: unknown head 'ctcc'; did you mean 'ctc'\?"):
        validate(load_spec(_write(tmp_path, GOOD.replace("{name: ctc}", "{name: ctcc}"))))


def test_wrong_type_and_unknown_trainer_setting_reported_together(tmp_path):
    text = GOOD.replace("trainer: {max_steps: 10}", "trainer: {max_step: 10, grad_accum: many}")
    with pytest.raises(SpecError) as err:
        validate(load_spec(_write(tmp_path, text)))
    message = str(err.value)
    assert "2 problems" in message
    assert "trainer.max_step: unknown setting; did you mean 'max_steps'?" in message
    assert "trainer.grad_accum: expected int, got str 'many'" in message


def test_unknown_top_level_key_and_task(tmp_path):
    text = GOOD.replace("task: finetune", "task: finetun\n    modle: {}")
    with pytest.raises(SpecError) as err:
        validate(load_spec(_write(tmp_path, text)))
    assert "unknown task 'finetun'; did you mean 'finetune'?" in str(err.value)
    assert "modle: unknown key; did you mean 'model'?" in str(err.value)


def test_overrides_parse_yaml_values_and_create_sections(tmp_path):
    spec = load_spec(_write(tmp_path, GOOD), ["trainer.max_steps=3", "model.encoder.layers=1",
                                              "data.train.splits=[a, b]", "trainer.output_dir=runs/x"])
    assert spec["trainer"]["max_steps"] == 3
    assert spec["model"]["encoder"] == {"layers": 1}
    assert spec["data"]["train"]["splits"] == ["a", "b"]
    with pytest.raises(SpecError, match="key.path=value"):
        apply_override(spec, "trainer.max_steps")


def test_missing_required_parameter():
    spec = spec_from_dict({"model": {"preset": "data2vec-audio-tiny", "head": {"name": "ctc"}},
                           "data": {"processor": {"name": "audio"}, "train": {"name": "librispeech"}},
                           "optim": {"name": "adam"}})
    with pytest.raises(SpecError, match="dataset 'librispeech' needs parameter 'root'"):
        validate(spec)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(_write(tmp_path, "model: [unclosed"))


def test_a_yaml_syntax_error_is_located_in_the_file(tmp_path):
    """FILE:LINE:COLUMN and the offending line, not PyYAML's 'in "<unicode string>", line 5'."""
    path = _write(tmp_path, "task: finetune\nmodel:\n  head: {name: ctc\ntrainer:\n  max_steps: 3\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4:8: not valid YAML: expected ',' or '}}', but got ':'")
    assert "(while parsing a flow mapping that starts at line 3)" in message
    assert "\n    trainer:\n           ^" in message and "<unicode string>" not in message


def test_a_problem_inside_an_override_is_reported_against_the_override(tmp_path):
    spec = load_spec(_write(tmp_path, GOOD), ["modle.head.num_labels=3"])
    with pytest.raises(SpecError, match=r"command-line override 'modle.head.num_labels=3': modle: unknown key; "
                                        r"did you mean 'model'"):
        validate(spec)
    assert spec.where("trainer.max_steps").startswith(str(tmp_path))  # keys from the file keep their line


def test_scientific_notation_is_a_float(tmp_path):
    spec = load_spec(_write(tmp_path, GOOD.replace("lr: 1.0e-4", "lr: 5e-4")), ["optim.eps=1e-8"])
    assert spec["optim"]["lr"] == 5e-4 and spec["optim"]["eps"] == 1e-8
    validate(spec)


def test_full_precision_written_as_a_bare_no_means_no(tmp_path):
    """YAML 1.1 reads `mixed_precision: no` (or the override `trainer.mixed_precision=no`) as
    false; that is what the user meant by 'no', not an error quoting their own word back."""
    from pathlib import Path

    from d2v.spec.config import TrainerConfig

    asr = Path(__file__).resolve().parents[2] / "experiments" / "asr_demo.yaml"
    spec = load_spec(asr, ["trainer.mixed_precision=no"])
    validate(spec)
    assert TrainerConfig(**spec["trainer"]).mixed_precision == "no"
    with pytest.raises(SpecError, match="expected one of auto, no, fp16, bf16; got True"):
        validate(load_spec(asr, ["trainer.mixed_precision=yes"]))


def test_output_dir_defaults_to_runs_slash_the_spec_file_stem(tmp_path):
    """Two demo specs without trainer.output_dir never write into one directory."""
    from d2v.spec.config import TrainerConfig

    first = load_spec(_write(tmp_path, GOOD.replace("trainer: {max_steps: 10}", "")))
    other = tmp_path / "keywords_try.yaml"
    other.write_text(textwrap.dedent(GOOD))
    second = load_spec(other)
    validate(first)
    assert TrainerConfig(**first["trainer"]).output_dir == "runs/spec"
    assert TrainerConfig(**second["trainer"]).output_dir == "runs/keywords_try"
    assert second["trainer"]["max_steps"] == 10
    assert load_spec(other, ["trainer.output_dir=elsewhere"])["trainer"]["output_dir"] == "elsewhere"
    assert load_spec(other, ["trainer={max_steps: 3}"])["trainer"]["output_dir"] == "runs/keywords_try"
    explicit = GOOD.replace("{max_steps: 10}", "{max_steps: 10, output_dir: runs/mine}")
    assert load_spec(_write(tmp_path, explicit))["trainer"]["output_dir"] == "runs/mine"
    # a spec built in Python has no file to be named after
    assert TrainerConfig(**(spec_from_dict({"trainer": {}})["trainer"])).output_dir == "runs/experiment"
