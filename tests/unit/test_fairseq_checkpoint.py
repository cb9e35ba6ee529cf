"""Reading fairseq checkpoints safely: config decoding, drift notes, damaged and malicious files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from d2v.api.errors import SpecError
from d2v.interop.fairseq import ConfigReader, read_fairseq_checkpoint
from d2v.interop.safe_pickle import Recorded, UnsafePickleError, load_untrusted
from fairseq_fixtures import save_fairseq_checkpoint

CFG = {
    "common": {"seed": 1},
    "task": {"_name": "audio_pretraining", "normalize": True, "sample_rate": 16000},
    "model": {"_name": "data2vec_audio", "encoder_layers": 2, "layer_norm_first": False,
              "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)]", "ema_anneal_end_step": "${model.encoder_layers}",
              "pos": [1, 2.5, None], "nested": {"a": "${task.sample_rate}"}},
}


@pytest.mark.parametrize("dictconfig", [True, False])
def test_config_weights_and_ema_come_back_as_plain_data(tmp_path, dictconfig):
    weights = {"encoder.w": torch.randn(3, 2), "mask_emb": torch.randn(4)}
    path = save_fairseq_checkpoint(tmp_path / "c.pt", CFG, weights, ema={"w": torch.ones(2)}, dictconfig=dictconfig)
    ckpt = read_fairseq_checkpoint(path)
    assert ckpt.name == "data2vec_audio"
    assert ckpt.model_cfg["encoder_layers"] == 2 and ckpt.model_cfg["layer_norm_first"] is False
    assert ckpt.model_cfg["pos"] == [1, 2.5, None]
    assert ckpt.model_cfg["ema_anneal_end_step"] == 2  # ${...} references resolved
    assert ckpt.model_cfg["nested"] == {"a": 16000}
    assert ckpt.cfg["task"]["normalize"] is True
    assert set(ckpt.model) == set(weights) and torch.equal(ckpt.model["encoder.w"], weights["encoder.w"])
    assert torch.equal(ckpt.ema["w"], torch.ones(2))


def test_legacy_namespace_args_become_the_model_config(tmp_path):
    import argparse

    args = argparse.Namespace(arch="data2vec_audio", encoder_layers=3, normalize=False)
    torch.save({"args": args, "model": {"w": torch.zeros(1)}}, tmp_path / "old.pt")
    ckpt = read_fairseq_checkpoint(tmp_path / "old.pt")
    assert ckpt.name == "data2vec_audio" and ckpt.model_cfg["encoder_layers"] == 3
    assert ckpt.cfg["task"]["normalize"] is False


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    torch.save({"cfg": {"model": {"_name": "x"}}, "model": {}, "extra_state": exploit}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match="system"):
        load_untrusted(tmp_path / "evil.pt")
    with pytest.raises(SpecError, match="refused to load .*could run code"):
        read_fairseq_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("call", ["builtins.eval", "builtins.exec", "builtins.getattr", "subprocess.Popen",
                                  "torch.load", "importlib.import_module"])
def test_dangerous_globals_are_refused(tmp_path, call):
    module, name = call.rsplit(".", 1)
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x001\x85R."
    (tmp_path / "p.pkl").write_bytes(payload)
    with pytest.raises(UnsafePickleError):
        with open(tmp_path / "p.pkl", "rb") as f:
            from d2v.interop.safe_pickle import _RestrictedPickleModule

            _RestrictedPickleModule.load(f)


def test_objects_of_known_libraries_are_inert_records(tmp_path):
    path = save_fairseq_checkpoint(tmp_path / "c.pt", CFG, {"w": torch.zeros(1)})
    state = load_untrusted(path)
    meter = state["extra_state"]["metrics"]["train"][0][1]
    assert isinstance(meter, Recorded) and meter.global_name == "fairseq.logging.meters.AverageMeter"
    assert meter.state["val"] == 3.2


def test_truncated_and_random_files_give_a_clear_error(tmp_path):
    good = save_fairseq_checkpoint(tmp_path / "good.pt", CFG, {"w": torch.randn(1000)})
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("cut.pt", "noise.pt", "empty.pt"):
        with pytest.raises(SpecError, match="not a readable PyTorch checkpoint.*download it again"):
            read_fairseq_checkpoint(tmp_path / name)
    with pytest.raises(SpecError, match="does not exist"):
        read_fairseq_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(SpecError, match="not a fairseq checkpoint"):
        read_fairseq_checkpoint(tmp_path / "list.pt")


def test_config_reader_defaults_missing_keys_and_reports_unknown_ones():
    reader = ConfigReader({"depth": 4, "rebuild_batches": True, "mask_prob": "???", "_name": "m"},
                          "cfg.model", known=["depth", "mask_prob", "layerdrop"])
    assert reader.get("depth", 8) == 4
    assert reader.get("mask_prob", 0.65) == 0.65
    assert reader.get("layerdrop", 0.0) == 0.0
    notes = reader.finish()
    assert any("cfg.model.mask_prob is missing; fairseq's default 0.65" in n for n in notes)
    assert any("cfg.model.layerdrop is missing" in n for n in notes)
    assert any("ignored: rebuild_batches" in n for n in notes)
    assert pickle.loads(pickle.dumps(notes)) == notes


def test_a_submodules_ema_is_read_with_its_prefix(tmp_path):
    """fairseq's data2vec_text keeps its teacher under ``encoder._ema``."""
    state = {"encoder.w": torch.zeros(2), "encoder._ema": {"w": torch.ones(2)}}
    torch.save({"cfg": {"model": {"_name": "data2vec_text"}}, "model": state}, tmp_path / "t.pt")
    ckpt = read_fairseq_checkpoint(tmp_path / "t.pt")
    assert set(ckpt.model) == {"encoder.w"} and torch.equal(ckpt.ema["encoder.w"], torch.ones(2))
