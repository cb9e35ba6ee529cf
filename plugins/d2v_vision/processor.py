"""The image processor ``image``: files -> normalised pixel batches, as Hugging Face's
``BeitImageProcessor`` (torchvision backend) does it: decode to RGB uint8, bicubic resize
(antialiased) to ``size``, optional centre crop to ``crop_size``, rescale by 1/255 and
normalise with ``image_mean``/``image_std`` (BEiT: 0.5, 0.5).

Training (``train=True``) uses the recipes' augmentations instead of the fixed resize:
``RandomResizedCrop`` to ``crop_size`` (scale ``min_crop_scale``..1), horizontal flip,
optional colour jitter and timm's RandAugment (``rand_augment: rand-m9-mstd0.5-inc1``, the
BEiT fine-tuning policy). Mixup/cutmix act on whole batches: the runner's classification
heads accept the soft targets timm's ``Mixup`` makes (``mixup``/``cutmix`` > 0 here).

Segmentation examples (``mask``: a label PNG) get the same geometric transform as the image
(nearest-neighbour) and ``do_reduce_labels`` (ADE20K: 0 -> 255 = ignored, k -> k-1).

Files are decoded with Pillow: grayscale, palette, CMYK and RGBA images are converted to RGB
(alpha dropped, as ``convert_rgb`` does), 16-bit grayscale is scaled to 8 bits; truncated or
unreadable files raise a :class:`d2v.api.errors.SpecError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from d2v.api.errors import BadFile, SpecError

RESAMPLE = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}
PIL_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, dict):
        value = [value.get("height"), value.get("width")]
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise SpecError(f"image processor: {name} must be a positive integer or [height, width], got {value!r}.")
    return int(pair[0]), int(pair[1])


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB: 16/32-bit grayscale scaled to 8 bits, alpha dropped, palettes expanded."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: keep the top 8 bits of range
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def read_rgb(path: str | Path) -> Image.Image:
    """An RGB PIL image from any file Pillow reads, with the conversions users expect."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise BadFile(f"image file '{path}' does not exist.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadFile(f"image file '{path}' cannot be decoded ({exc}); it may be truncated or not an image. "
                        f"Re-download or remove it.") from None


def read_label_map(path: str | Path) -> torch.Tensor:
    """A segmentation label PNG as ``(H, W)`` int64 class ids (palette indices kept)."""
    try:
        with Image.open(path) as image:
            image.load()
            array = np.asarray(image if image.mode in ("L", "P", "I", "I;16") else image.convert("L"))
    except FileNotFoundError:
        raise BadFile(f"segmentation map '{path}' does not exist.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadFile(f"segmentation map '{path}' cannot be decoded ({exc}).") from None
    return torch.from_numpy(array.astype(np.int64))


class ImageProcessor:
    """Parameters (Hugging Face ``BeitImageProcessor`` names and defaults): ``size``,
    ``crop_size``, ``do_resize``, ``do_center_crop``, ``resample``, ``rescale_factor``,
    ``image_mean``, ``image_std``, ``do_reduce_labels``; training augmentation:
    ``augment`` (False: the evaluation transform also in training), ``min_crop_scale``,
    ``hflip``, ``color_jitter``, ``rand_augment`` (a timm RandAugment string or None)."""

    def __init__(self, *, size: Any = 224, crop_size: Any = 224, do_resize: bool = True, do_center_crop: bool = False,
                 resample: str = "bicubic", rescale_factor: float = 1 / 255,
                 image_mean: list[float] = (0.5, 0.5, 0.5), image_std: list[float] = (0.5, 0.5, 0.5),
                 do_reduce_labels: bool = False, augment: bool = True, min_crop_scale: float = 0.08,
                 hflip: float = 0.5, color_jitter: float = 0.0, rand_augment: str | None = None,
                 mixup: float = 0.0, cutmix: float = 0.0, label_smoothing: float = 0.0, num_classes: int | None = None):
        if resample not in RESAMPLE:
            raise SpecError(f"image processor: resample must be one of {', '.join(RESAMPLE)}, got {resample!r}.")
        self.size, self.crop_size = _pair(size, "size"), _pair(crop_size, "crop_size")
        self.do_resize, self.do_center_crop = bool(do_resize), bool(do_center_crop)
        self.resample = resample
        self.rescale_factor = float(rescale_factor)
        self.image_mean, self.image_std = [float(v) for v in image_mean], [float(v) for v in image_std]
        self.do_reduce_labels = bool(do_reduce_labels)
        self.augment, self.min_crop_scale, self.hflip = bool(augment), float(min_crop_scale), float(hflip)
        self.color_jitter = float(color_jitter)
        self.rand_augment = rand_augment
        self.mixup = None
        if mixup > 0 or cutmix > 0 or label_smoothing > 0:
            if not num_classes:
                raise SpecError("image processor: mixup/cutmix/label_smoothing need num_classes (the head's classes).")
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=float(mixup), cutmix_alpha=float(cutmix),
                               label_smoothing=float(label_smoothing), num_classes=int(num_classes))

    def hf_config(self) -> dict[str, Any]:
        """``preprocessor_config.json`` for ``BeitImageProcessor``."""
        return {"image_processor_type": "BeitImageProcessor", "do_resize": self.do_resize,
                "size": {"height": self.size[0], "width": self.size[1]}, "resample": PIL_RESAMPLE[self.resample],
                "do_center_crop": self.do_center_crop,
                "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]}, "do_rescale": True,
                "rescale_factor": self.rescale_factor, "do_normalize": True, "image_mean": self.image_mean,
                "image_std": self.image_std, "do_reduce_labels": self.do_reduce_labels}

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop_size if self.do_center_crop or self.augment else self.size

    # -- transforms ---------------------------------------------------------------------------

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32) * self.rescale_factor
        mean = torch.tensor(self.image_mean).view(-1, 1, 1)
        std = torch.tensor(self.image_std).view(-1, 1, 1)
        return (x - mean) / std

    def eval_transform(self, pixels: torch.Tensor, label: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        if self.do_resize:
            pixels = tvF.resize(pixels, list(self.size), interpolation=RESAMPLE[self.resample], antialias=True)
            if label is not None:
                label = tvF.resize(label[None], list(self.size), interpolation=InterpolationMode.NEAREST)[0]
        if self.do_center_crop:
            pixels = tvF.center_crop(pixels, list(self.crop_size))
            if label is not None:
                label = tvF.center_crop(label[None], list(self.crop_size))[0]
        return pixels, label

    def train_transform(self, pixels: torch.Tensor, label: torch.Tensor | None,
                        generator: torch.Generator) -> tuple[torch.Tensor, Any]:
        height, width = pixels.shape[-2:]
        area = height * width
        for _ in range(10):  # torchvision's RandomResizedCrop, drawn from our generator
            target = area * float(torch.empty(()).uniform_(self.min_crop_scale, 1.0, generator=generator))
            log_ratio = float(torch.empty(()).uniform_(np.log(3 / 4), np.log(4 / 3), generator=generator))
            w = int(round((target * np.exp(log_ratio)) ** 0.5))
            h = int(round((target / np.exp(log_ratio)) ** 0.5))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                break
        else:
            h, w, top, left = height, width, 0, 0
        pixels = tvF.resized_crop(pixels, top, left, h, w, list(self.crop_size),
                                  interpolation=RESAMPLE[self.resample], antialias=True)
        if label is not None:
            label = tvF.resized_crop(label[None], top, left, h, w, list(self.crop_size),
                                     interpolation=InterpolationMode.NEAREST)[0]
        if float(torch.rand((), generator=generator)) < self.hflip:
            pixels = tvF.horizontal_flip(pixels)
            label = None if label is None else tvF.horizontal_flip(label)
        if self.color_jitter > 0:
            j = self.color_jitter
            factors = torch.empty(3).uniform_(max(0.0, 1 - j), 1 + j, generator=generator).tolist()
            pixels = tvF.adjust_brightness(pixels, factors[0])
            pixels = tvF.adjust_contrast(pixels, factors[1])
            pixels = tvF.adjust_saturation(pixels, factors[2])
        if self.rand_augment:
            from timm.data.auto_augment import rand_augment_transform

            policy = rand_augment_transform(self.rand_augment, {"translate_const": int(min(self.crop_size) * 0.45)})
            pixels = tvF.pil_to_tensor(policy(tvF.to_pil_image(pixels)))
        return pixels, label

    # -- data pipeline ------------------------------------------------------------------------

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """Evaluation preprocessing of PIL images -> ``(B, 3, H, W)`` (``BeitImageProcessor(images)``)."""
        return torch.stack([self.normalize(self.eval_transform(tvF.pil_to_tensor(im.convert("RGB")), None)[0])
                            for im in images])

    #: what ``d2v predict`` picks from a directory
    file_suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

    def examples_from(self, item: Any, *, task: str = "", fields: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One example for ``d2v predict`` / :func:`d2v.pipeline` (with ``fields`` added): an image
        file (path) or a PIL image; :meth:`load` decodes and converts it (the file is not opened here)."""
        if isinstance(item, Image.Image):
            return [{**(fields or {}), "image": item}]
        return [{**(fields or {}), "path": str(item)}]

    def load(self, example: dict[str, Any], *, train: bool = False,
             generator: torch.Generator | None = None) -> dict[str, Any]:
        image = to_rgb(example["image"]) if "image" in example else read_rgb(example["path"])
        pixels = tvF.pil_to_tensor(image)
        original_size = tuple(pixels.shape[-2:])
        label = read_label_map(example["mask"]) if example.get("mask") else None
        if label is not None and label.shape != pixels.shape[-2:]:
            raise SpecError(f"segmentation map '{example['mask']}' is {tuple(label.shape)} but its image "
                            f"'{example['path']}' is {tuple(pixels.shape[-2:])}.")
        if label is not None and self.do_reduce_labels:
            label = torch.where(label == 0, 255, label - 1)
            label = torch.where(label == 254, 255, label)
        if train and self.augment:
            pixels, label = self.train_transform(pixels, label, generator or torch.Generator().manual_seed(0))
        else:
            pixels, label = self.eval_transform(pixels, label)
        out = {"id": example.get("id", str(example.get("path", ""))), "pixels": self.normalize(pixels), "train": bool(train),
               "original_size": original_size}
        if label is not None:
            out["label_map"] = label
        elif "label" in example:
            out["label"] = int(example["label"])
        return out

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sizes = {tuple(e["pixels"].shape) for e in examples}
        if len(sizes) != 1:
            raise SpecError(f"image processor: a batch holds images of different sizes {sorted(sizes)}; set "
                            f"data.processor.size (and do_center_crop/crop_size) so every image is resized alike.")
        batch: dict[str, Any] = {"ids": [e["id"] for e in examples], "inputs": torch.stack([e["pixels"] for e in examples])}
        if all("original_size" in e for e in examples):  # (height, width) before resizing: masks at the image's size
            batch["original_sizes"] = [e["original_size"] for e in examples]
        if all("label_map" in e for e in examples):
            batch["labels"] = torch.stack([e["label_map"] for e in examples])
        elif all("label" in e for e in examples):
            batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
            # timm's Mixup (training batches of even size): mixed images, soft targets
            if self.mixup is not None and all(e.get("train") for e in examples) and len(examples) % 2 == 0:
                batch["inputs"], batch["labels"] = self.mixup(batch["inputs"], batch["labels"])
        return batch
