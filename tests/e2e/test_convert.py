"""`d2v convert`: Hugging Face -> d2v checkpoint -> Hugging Face gives the same model."""

import pytest
import torch
import yaml

from d2v.cli.main import main

transformers = pytest.importorskip("transformers")


def _tiny_hf_ctc(path):
    config = transformers.Data2VecAudioConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16), conv_kernel=(10, 4), conv_stride=(5, 4), num_conv_pos_embeddings=2,
        conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4, vocab_size=32, mask_time_prob=0.0,
    )
    config.architectures = ["Data2VecAudioForCTC"]
    torch.manual_seed(0)
    model = transformers.Data2VecAudioForCTC(config).eval()
    model.save_pretrained(path)
    return model


def test_round_trip_through_d2v_checkpoint(tmp_path):
    original = _tiny_hf_ctc(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "d2v"), "--to", "d2v"]) == 0
    spec = yaml.safe_load((tmp_path / "d2v" / "spec.yaml").read_text())
    assert spec["model"]["head"]["name"] == "ctc" and spec["model"]["encoder"]["layers"] == 2
    assert main(["convert", str(tmp_path / "d2v"), str(tmp_path / "back"), "--to", "hf"]) == 0
    reloaded = transformers.Data2VecAudioForCTC.from_pretrained(tmp_path / "back").eval()
    audio = torch.randn(2, 4000)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(audio).logits, original(audio).logits, atol=1e-5, rtol=0)


def test_refuses_to_overwrite(tmp_path, capsys):
    _tiny_hf_ctc(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "d2v"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_a_text_model_without_pooler_says_so(tmp_path, capsys):
    """A bare Data2VecTextModel without a pooler (data2vec text has none) exports without
    pooler.dense; config.json cannot tell transformers so, the report does, and its advice loads
    the export with nothing newly initialised."""
    config = transformers.Data2VecTextConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=20)
    transformers.Data2VecTextModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "d2v"), "--to", "d2v"]) == 0
    assert "pooler" not in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "d2v"), str(tmp_path / "back"), "--to", "hf"]) == 0
    report = capsys.readouterr().out
    assert "note: this model has no pooler, so pooler.dense is not in the checkpoint" in report
    assert "pooler_output is not meaningful" in report and "last_hidden_state[:, 0]" in report
    _, info = transformers.Data2VecTextModel.from_pretrained(tmp_path / "back", add_pooling_layer=False,
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_an_unanticipated_failure_is_a_named_error_and_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    """A converter bug or an unknown layout: one line naming the source, the exception and where in
    d2v it happened; the half-written destination is removed (it would load as a damaged model)."""
    import d2v.interop.convert

    _tiny_hf_ctc(tmp_path / "hf")
    capsys.readouterr()

    def broken_save(state, path, metadata=None):
        raise RuntimeError("The size of tensor a (32) must match the size of tensor b (16) at dimension 0\nmore")

    monkeypatch.setattr(d2v.interop.convert, "save_file", broken_save)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "d2v"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"could not convert '{tmp_path / 'hf'}': RuntimeError in convert.py:" in err
    assert "(hf_to_d2v): The size of tensor a (32) must match" in err and "D2V_DEBUG=1" in err
    assert not (tmp_path / "out").exists()

    (tmp_path / "empty").mkdir()  # an empty destination the user made stays, emptied again
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "empty"), "--to", "d2v"]) == 2
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())

    monkeypatch.setenv("D2V_DEBUG", "1")  # the traceback, for a bug report
    with pytest.raises(Exception, match="could not convert") as info:
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "d2v"])
    assert isinstance(info.value.__cause__, RuntimeError)
