"""Parity with Hugging Face ``Data2VecVision*``: tiny random HF models -> imported -> the same
outputs and losses (atol 1e-5, fp32, eval); exports load back into ``transformers``; the image
processor equals ``BeitImageProcessor`` on real photos."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from d2v.interop.hf import from_pretrained  # noqa: E402

ATOL = 1e-5

BACKBONES = {
    "per_layer_rel_bias": dict(use_relative_position_bias=True),
    "shared_rel_bias": dict(use_shared_relative_position_bias=True),
    "abs_positions_cls_pool": dict(use_absolute_position_embeddings=True, use_mean_pooling=False),
    "all_positions_no_layer_scale": dict(use_absolute_position_embeddings=True, use_relative_position_bias=True,
                                         use_shared_relative_position_bias=True, layer_scale_init_value=0.0),
}


def tiny_config(**overrides):
    base = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=16,
                patch_size=4, num_channels=3, use_mask_token=True, out_indices=[1, 2, 3, 4], pool_scales=[1, 2],
                auxiliary_channels=8, num_labels=5, drop_path_rate=0.0, hidden_act="gelu")
    base.update(overrides)
    return transformers.Data2VecVisionConfig(**base)


def randomize(model):
    """Non-trivial values for parameters HF initialises to constants (tables, tokens, norms)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or "token" in name or "position_embeddings" in name \
                    or "lambda" in name:
                p.normal_(0, 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def save_hf(cls, config, tmp_path):
    torch.manual_seed(1)
    model = randomize(cls(config))
    model.save_pretrained(tmp_path / "hf")
    return model, from_pretrained(tmp_path / "hf")


def pixels(size, batch=2, seed=3):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(BACKBONES))
def test_model_outputs_match(variant, tmp_path, single_thread):
    config = tiny_config(**BACKBONES[variant])
    hf, ours = save_hf(transformers.Data2VecVisionModel, config, tmp_path)
    x = pixels(16)
    masked = torch.rand(2, 16, generator=torch.Generator().manual_seed(4)) < 0.5
    with torch.no_grad():
        for kwargs in ({}, {"bool_masked_pos": masked}):
            expected = hf(pixel_values=x, output_hidden_states=True, **kwargs)
            got = ours(pixel_values=x, output_hidden_states=True, **kwargs)
            torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)
            for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
            assert got.pooler_output is None and expected.pooler_output is None


@pytest.mark.parametrize("variant", sorted(BACKBONES))
def test_classification_matches_at_two_sizes(variant, tmp_path, single_thread):
    config = tiny_config(**BACKBONES[variant])
    hf, ours = save_hf(transformers.Data2VecVisionForImageClassification, config, tmp_path)
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        for size in (16, 24):  # 24 px: a 6x6 grid, positions and relative-bias tables resized
            x = pixels(size)
            expected = hf(pixel_values=x, labels=labels, interpolate_pos_encoding=size != 16)
            got = ours(pixel_values=x, labels=labels, interpolate_pos_encoding=size != 16)
            torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
            torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("auxiliary", [True, False])
def test_segmentation_matches(auxiliary, tmp_path, single_thread):
    config = tiny_config(use_relative_position_bias=True, use_auxiliary_head=auxiliary, auxiliary_concat_input=auxiliary)
    hf, ours = save_hf(transformers.Data2VecVisionForSemanticSegmentation, config, tmp_path)
    x = pixels(16)
    labels = torch.randint(0, 5, (2, 16, 16), generator=torch.Generator().manual_seed(5))
    labels[0, :3] = 255  # ignored pixels
    with torch.no_grad():
        expected = hf(pixel_values=x, labels=labels)
        got = ours(pixel_values=x, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cls", ["Data2VecVisionModel", "Data2VecVisionForImageClassification",
                                 "Data2VecVisionForSemanticSegmentation"])
def test_export_loads_back_into_transformers(cls, tmp_path, single_thread):
    hf_cls = getattr(transformers, cls)
    config = tiny_config(use_shared_relative_position_bias=True, use_absolute_position_embeddings=True)
    hf, ours = save_hf(hf_cls, config, tmp_path)
    ours.save_pretrained(tmp_path / "export")
    reloaded = hf_cls.from_pretrained(tmp_path / "export").eval()
    x = pixels(16)
    with torch.no_grad():
        a, b = hf(pixel_values=x), reloaded(pixel_values=x)
    key = "last_hidden_state" if cls == "Data2VecVisionModel" else "logits"
    torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=0)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "export")
    assert processor.size["height"] == 16


def test_processor_equals_beit_image_processor_on_real_photos(single_thread):
    cbook = pytest.importorskip("matplotlib.cbook")
    from PIL import Image

    from d2v_vision.processor import ImageProcessor, read_rgb

    paths = [cbook.get_sample_data("grace_hopper.jpg", asfileobj=False),
             cbook.get_sample_data("Minduka_Present_Blue_Pack.png", asfileobj=False)]
    images = [read_rgb(p) for p in paths]
    for kwargs in ({}, {"size": {"height": 256, "width": 256}, "do_center_crop": True},
                   {"size": {"height": 96, "width": 160}, "image_mean": [0.485, 0.456, 0.406],
                    "image_std": [0.229, 0.224, 0.225]}):
        reference = transformers.BeitImageProcessor(**kwargs)
        ours = ImageProcessor(**{k: v for k, v in kwargs.items()}, augment=False)
        for image in images:
            expected = reference(images=image, return_tensors="pt")["pixel_values"]
            got = ours([image])
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert isinstance(images[1], Image.Image) and images[1].mode == "RGB"


@pytest.mark.parametrize("variant", sorted(BACKBONES))
def test_non_square_images_match(variant, tmp_path, single_thread):
    """A 16x28 image (a 4x7 patch grid, trained at 4x4): the feature extractor hands the grid to
    the encoder, so positions and relative-bias tables resize as Hugging Face resizes them.
    (Hugging Face's segmentation head reshapes to a square grid and fails here; d2v's runs.)"""
    config = tiny_config(**BACKBONES[variant])
    hf, ours = save_hf(transformers.Data2VecVisionForImageClassification, config, tmp_path)
    x = torch.randn(2, 3, 16, 28, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        expected = hf(pixel_values=x, labels=labels, interpolate_pos_encoding=True, output_hidden_states=True)
        got = ours(pixel_values=x, labels=labels, interpolate_pos_encoding=True, output_hidden_states=True)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_segmentation_runs_on_non_square_images(tmp_path, single_thread):
    config = tiny_config(use_relative_position_bias=True)
    _, ours = save_hf(transformers.Data2VecVisionForSemanticSegmentation, config, tmp_path)
    with torch.no_grad():
        out = ours(pixel_values=torch.randn(1, 3, 16, 28), labels=torch.zeros(1, 16, 28, dtype=torch.long))
    assert out.logits.shape == (1, 5, 16, 28) and torch.isfinite(out.loss)  # the FPN's 4x patch grid
