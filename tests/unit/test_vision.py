"""Vision modality units: kept-token relative bias, grid handling, processor file handling,
segmentation metrics, layer-wise lr decay names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from d2v.api.errors import SpecError
from d2v_heads.vision.segmentation_metrics import segmentation_counts, segmentation_summary
from d2v_vision.encoder import VisionTransformerEncoder
from d2v_vision.patches import PatchEmbedding
from d2v_vision.processor import ImageProcessor, read_rgb

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(**kw):
    torch.manual_seed(0)
    enc = VisionTransformerEncoder(dim=16, layers=2, heads=2, ffn_dim=32, image_size=16, patch_size=4,
                                   drop_path_rate=0.0, **kw).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "table" in name:
                p.normal_()
    return enc


@pytest.mark.parametrize("kw", [dict(use_shared_relative_position_bias=True), dict(use_relative_position_bias=True)])
def test_kept_tokens_keep_their_relative_bias(kw):
    """Running on a subset with position_ids equals attention restricted to that subset."""
    enc = tiny(**kw)
    x = torch.randn(1, 17, 16)
    keep = torch.tensor([[0, 2, 5, 11, 16]])
    got = enc.contextualize(x[:, keep[0]], position_ids=keep).last_hidden_state
    # reference: full sequence with every other key blocked via the padding mask -> same softmax support
    pad = torch.ones(1, 17, dtype=torch.bool)
    pad[0, keep[0]] = False
    full = enc.contextualize(x, pad).last_hidden_state[:, keep[0]]
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_grid_errors_and_square_fallback():
    enc = tiny(use_absolute_position_embeddings=True)
    assert enc.grid_for(17) == (4, 4) and enc.grid_for(37) == (6, 6)
    with pytest.raises(SpecError, match="image_size"):
        enc.grid_for(1 + 12)
    with pytest.raises(SpecError, match="multiple of patch_size"):
        PatchEmbedding(dim=16, image_size=16, patch_size=4)(torch.zeros(1, 3, 18, 16))


def test_processor_converts_modes_and_names_bad_files(tmp_path):
    gray16 = tmp_path / "g16.png"
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(gray16)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (20, 30), (10, 20, 30, 0)).save(rgba)
    for path in (gray16, rgba):
        assert read_rgb(path).mode == "RGB"
    assert read_rgb(gray16).getextrema()[0][1] > 200  # 16-bit range scaled, not clipped
    good = tmp_path / "ok.jpg"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(good)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(SpecError, match="cut.jpg"):
        read_rgb(truncated)
    proc = ImageProcessor(size=16, crop_size=16)
    item = proc.load({"path": str(good), "label": 1}, train=True, generator=torch.Generator().manual_seed(0))
    assert item["pixels"].shape == (3, 16, 16) and item["label"] == 1


def test_segmentation_metrics_known_values():
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 1]])
    target = torch.tensor([[0, 1, 1, 1], [2, 2, 255, 0]])
    summary = segmentation_summary(segmentation_counts(pred, target, 3, 255), 3)
    # class 0: I=1 U=3; class 1: I=2 U=4; class 2: I=2 U=2 (ignored pixel excluded)
    assert summary["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 4 + 1) / 3)
    assert summary["pixel_accuracy"] == pytest.approx(100 * 5 / 7)


def test_layer_decay_puts_vision_blocks_in_order():
    from d2v.spec.model import TaskModel
    from d2v.train.optim import adamw
    from d2v_heads.vision.image_classification import ImageClassificationHead

    enc = tiny(use_shared_relative_position_bias=True)
    model = TaskModel(PatchEmbedding(dim=16, image_size=16, patch_size=4), enc,
                      ImageClassificationHead(input_dim=16, num_labels=3))
    opt = adamw(model, lr=1.0, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["feature_extractor.cls_token"])] == pytest.approx(0.5 ** 3)
    assert scale[id(named["encoder.layers.0.norm1.weight"])] == pytest.approx(0.5 ** 2)
    assert scale[id(named["encoder.layers.1.mlp.fc1.weight"])] == pytest.approx(0.5)
    for top in ("head.classifier.weight", "encoder.pooler_norm.weight", "encoder.relative_position_bias.table"):
        assert scale[id(named[top])] == pytest.approx(1.0)
    assert decay[id(named["feature_extractor.cls_token"])] == 0.0
    assert decay[id(named["encoder.relative_position_bias.table"])] == 0.0
    assert decay[id(named["encoder.layers.0.mlp.fc1.weight"])] > 0
