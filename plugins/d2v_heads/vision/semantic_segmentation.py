"""Semantic segmentation: Hugging Face's ``Data2VecVisionForSemanticSegmentation`` head.

The encoder's hidden states at ``out_indices`` (1-based layer numbers) become 2-D maps, brought
to four scales (``fpn1`` x4 up, ``fpn2`` x2 up, ``fpn3`` as is, ``fpn4`` /2), then UperNet
(``decode_head``: PSP pooling over the coarsest map + an FPN over all four) predicts class
logits at 1/4 of the input; the optional FCN ``auxiliary_head`` reads the third map. Loss:
cross-entropy of the logits bilinearly upsampled to the labels, ``ignore_index`` pixels
skipped, plus ``auxiliary_loss_weight`` x the auxiliary loss. Module names follow Hugging Face.

Metrics (percent, :mod:`d2v_heads.vision.segmentation_metrics`): ``mIoU`` and ``pixel_accuracy`` of
the predictions upsampled to the label size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v import hookimpl
from d2v.api.errors import SpecError
from d2v import EncoderOutput, Head, HeadOutput, ResultFile
from d2v_heads.shared.label_names import resolve_label_names
from d2v_heads.vision.segmentation_metrics import segmentation_counts, segmentation_summary


@hookimpl
def d2v_register(register):
    register("head", "semantic_segmentation", "d2v_heads.vision.semantic_segmentation:SemanticSegmentationHead",
             summary="UperNet (PSP + FPN over out_indices) + FCN auxiliary head (HF Data2VecVisionForSemanticSegmentation); "
                     "cross-entropy with ignore index; mIoU, pixel accuracy",
        modalities=("image",),
    )


class ConvLayer(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm -> ReLU (HF ``Data2VecVisionConvLayer``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.normalization = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU()


def adaptive_avg_pool_by_cells(x: Tensor, size: int) -> Tensor:
    """``AdaptiveAvgPool2d(size)`` as one mean per output cell (PyTorch's cell bounds
    ``floor(i*n/size)`` to ``ceil((i+1)*n/size)``): ONNX's pooling cannot express output sizes that
    do not divide the input (a 7x7 map pooled to 2, 3 and 6 in every BEiT UperNet)."""
    height, width = (int(side) for side in x.shape[-2:])
    bounds = [[(i * n // size, -(-(i + 1) * n // size)) for i in range(size)] for n in (height, width)]
    rows = [torch.stack([x[..., top:bottom, left:right].mean(dim=(-2, -1)) for left, right in bounds[1]], dim=-1)
            for top, bottom in bounds[0]]
    return torch.stack(rows, dim=-2)


class PoolingBlock(nn.Module):
    def __init__(self, scale: int, in_channels: int, channels: int):
        super().__init__()
        self.pooling = nn.AdaptiveAvgPool2d(int(scale))
        self.conv = ConvLayer(in_channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        exporting = torch.onnx.is_in_onnx_export()  # same numbers, ONNX-expressible ops
        pooled = adaptive_avg_pool_by_cells(x, self.pooling.output_size) if exporting else self.pooling(x)
        return F.interpolate(self.conv(pooled), size=x.shape[2:], mode="bilinear", align_corners=False)


class PoolingModule(nn.Module):
    def __init__(self, scales: Sequence[int], in_channels: int, channels: int):
        super().__init__()
        self.blocks = nn.ModuleList(PoolingBlock(s, in_channels, channels) for s in scales)


class UperHead(nn.Module):
    """UperNet over four ``channels``-wide maps (finest first)."""

    def __init__(self, *, channels: int, num_labels: int, pool_scales: Sequence[int]):
        super().__init__()
        self.classifier = nn.Conv2d(channels, num_labels, kernel_size=1)
        self.psp_modules = PoolingModule(pool_scales, channels, channels)
        self.psp_bottleneck = ConvLayer(channels * (1 + len(pool_scales)), channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvLayer(channels, channels) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvLayer(channels, channels, 3, padding=1) for _ in range(3))
        self.fpn_bottleneck = ConvLayer(4 * channels, channels, 3, padding=1)

    def forward(self, maps: list[Tensor]) -> Tensor:
        top = maps[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps)]
        laterals.append(self.psp_bottleneck(torch.cat([top, *(b(top) for b in self.psp_modules.blocks)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="bilinear", align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [F.interpolate(x, size=outs[0].shape[2:], mode="bilinear", align_corners=False) for x in outs[1:]]
        return self.classifier(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(nn.Module):
    """``num_convs`` 3x3 ConvLayers (+ optional concat with the input) -> 1x1 classifier, on map ``in_index``."""

    def __init__(self, *, in_channels: int, channels: int, num_labels: int, num_convs: int, concat_input: bool,
                 in_index: int = 2):
        super().__init__()
        self.in_index = in_index
        self.convs = nn.ModuleList(ConvLayer(in_channels if i == 0 else channels, channels, 3, padding=1)
                                   for i in range(num_convs))
        self.conv_cat = ConvLayer(in_channels + channels, channels, 3, padding=1) if concat_input else None
        self.classifier = nn.Conv2d(channels, num_labels, kernel_size=1)

    def forward(self, maps: list[Tensor]) -> Tensor:
        residual = x = maps[self.in_index]
        for conv in self.convs:
            x = conv(x)
        if self.conv_cat is not None:
            x = self.conv_cat(torch.cat([residual, x], dim=1))
        return self.classifier(x)


class SemanticSegmentationHead(Head):
    """Parameters (Hugging Face's names and defaults): ``input_dim`` (injected), ``num_labels``
    or ``label_names``, ``out_indices`` (4 numbers: hidden state ``i - 1`` is used, Hugging Face's convention), ``pool_scales``, ``use_auxiliary_head``,
    ``auxiliary_loss_weight``, ``auxiliary_channels``, ``auxiliary_num_convs``,
    ``auxiliary_concat_input``, ``semantic_loss_ignore_index``."""

    needs_hidden_states = True
    tasks = ("image-segmentation",)

    def __init__(self, *, input_dim: int, num_labels: int | None = None, label_names: list[str] | None = None,
                 out_indices: Sequence[int] = (3, 5, 7, 11), pool_scales: Sequence[int] = (1, 2, 3, 6),
                 use_auxiliary_head: bool = True, auxiliary_loss_weight: float = 0.4, auxiliary_channels: int = 256,
                 auxiliary_num_convs: int = 1, auxiliary_concat_input: bool = False,
                 semantic_loss_ignore_index: int = 255, num_layers: int | None = None):
        super().__init__()
        names = resolve_label_names(num_labels, label_names, "head semantic_segmentation", default=False)
        num_labels = len(names) if names is not None else int(num_labels)
        if num_labels < 2:
            raise SpecError("head semantic_segmentation: set num_labels (>= 2) or label_names (class names).")
        if len(out_indices) != 4:
            raise SpecError(f"head semantic_segmentation: out_indices needs 4 layer numbers, got {list(out_indices)}.")
        if num_layers is not None and any(not 1 <= int(i) <= num_layers + 1 for i in out_indices):
            raise SpecError(f"head semantic_segmentation: out_indices {list(out_indices)} must be within 1..{num_layers + 1} "
                            f"(hidden state i-1 is used, as Hugging Face does).")
        dim = int(input_dim)
        self.label_names = names
        self.num_labels = int(num_labels)
        self.out_indices = [int(i) for i in out_indices]
        self.pool_scales = [int(s) for s in pool_scales]
        self.auxiliary_loss_weight = float(auxiliary_loss_weight)
        self.ignore_index = int(semantic_loss_ignore_index)
        self.auxiliary = {"auxiliary_channels": int(auxiliary_channels), "auxiliary_num_convs": int(auxiliary_num_convs),
                          "auxiliary_concat_input": bool(auxiliary_concat_input)}
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.decode_head = UperHead(channels=dim, num_labels=self.num_labels, pool_scales=self.pool_scales)
        self.auxiliary_head = None
        if use_auxiliary_head:
            self.auxiliary_head = FCNHead(in_channels=dim, channels=int(auxiliary_channels), num_labels=self.num_labels,
                                          num_convs=int(auxiliary_num_convs), concat_input=bool(auxiliary_concat_input))

    def hf_config(self) -> dict[str, Any]:
        names = self.label_names or [f"LABEL_{i}" for i in range(self.num_labels)]
        return {"num_labels": self.num_labels, "id2label": {str(i): n for i, n in enumerate(names)},
                "label2id": {n: i for i, n in enumerate(names)}, "out_indices": list(self.out_indices),
                "pool_scales": list(self.pool_scales), "use_auxiliary_head": self.auxiliary_head is not None,
                "auxiliary_loss_weight": self.auxiliary_loss_weight, **self.auxiliary,
                "semantic_loss_ignore_index": self.ignore_index}

    def feature_maps(self, encoder_output: EncoderOutput, image_size: tuple[int, int]) -> list[Tensor]:
        hidden = encoder_output.hidden_states
        if hidden is None:
            raise SpecError("head semantic_segmentation needs the encoder's hidden states.")
        batch, tokens, dim = hidden[0].shape
        patches = tokens - 1
        patch = math.sqrt(image_size[0] * image_size[1] / patches)  # the side of one patch in pixels
        grid = (round(image_size[0] / patch), round(image_size[1] / patch))
        # Hugging Face keeps hidden state ``idx`` when ``idx + 1`` is in out_indices
        chosen = [x for idx, x in enumerate(hidden) if idx + 1 in self.out_indices]
        maps = [x[:, 1:].transpose(1, 2).reshape(batch, dim, *grid) for x in chosen]
        return [op(x) for op, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]

    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any]) -> HeadOutput:
        image_size = tuple(int(side) for side in batch["inputs"].shape[-2:])  # plain ints, also when traced
        maps = self.feature_maps(encoder_output, image_size)
        logits = self.decode_head(maps)
        auxiliary = self.auxiliary_head(maps) if self.auxiliary_head is not None else None
        labels = batch.get("labels")
        loss = None
        if labels is not None:
            labels = torch.as_tensor(labels).to(logits.device).long()
            loss = self.loss(logits, labels)
            if auxiliary is not None:
                loss = loss + self.auxiliary_loss_weight * self.loss(auxiliary, labels)
        return HeadOutput(logits=logits, loss=loss, extras=None if auxiliary is None else {"auxiliary_logits": auxiliary})

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(upsampled, labels, ignore_index=self.ignore_index)

    def upsampled_predictions(self, output: HeadOutput, size: tuple[int, int]) -> Tensor:
        logits = F.interpolate(output.logits.detach(), size=size, mode="bilinear", align_corners=False)
        return logits.argmax(1)

    def predict(self, output: HeadOutput, batch: dict[str, Any]) -> list[Any]:
        """One ``H x W`` class map (nested lists) per image, at the input size."""
        return [p.tolist() for p in self.upsampled_predictions(output, tuple(batch["inputs"].shape[-2:]))]

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """Per image: the class ``mask`` at the image's own size (``batch["original_sizes"]``, else
        the input size) -- the argmax of the logits bilinearly upsampled to it, as Hugging Face's
        ``post_process_semantic_segmentation`` -- as a PNG of class ids (8-bit, 16-bit past 256
        classes; ``value``: the ``(H, W)`` array), and the ``labels`` it shows with the fraction
        of pixels each covers, largest first."""
        sizes = batch.get("original_sizes") or [tuple(batch["inputs"].shape[-2:])] * output.logits.shape[0]
        names = self.label_names or list(range(self.num_labels))
        out = []
        for logits, size in zip(output.logits.detach().float(), sizes):
            classes = self.upsampled_predictions(HeadOutput(logits=logits[None]), tuple(int(s) for s in size))[0].cpu()
            counts = torch.bincount(classes.flatten(), minlength=self.num_labels).tolist()
            shown = sorted((c for c in range(self.num_labels) if counts[c]), key=lambda c: -counts[c])
            out.append({"labels": [{"label": names[c], "fraction": counts[c] / classes.numel()} for c in shown],
                        "mask": mask_png(classes)})
        return out

    def references(self, batch: dict[str, Any]) -> list[Any]:
        labels = batch.get("labels")
        return super().references(batch) if labels is None else [t.tolist() for t in torch.as_tensor(labels)]

    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, float]:
        labels = batch.get("labels")
        if labels is None:
            return {}
        labels = torch.as_tensor(labels)
        pred = self.upsampled_predictions(output, tuple(labels.shape[-2:]))
        return segmentation_counts(pred, labels, self.num_labels, self.ignore_index)

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        return segmentation_summary(counts, self.num_labels)


def mask_png(classes: Tensor) -> ResultFile:
    """An ``(H, W)`` class-id map as a PNG: 8-bit grey for up to 256 classes, else 16-bit."""
    import io

    import numpy as np
    from PIL import Image

    array = classes.numpy().astype(np.uint8 if int(classes.max()) < 256 else np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return ResultFile(data=buffer.getvalue(), suffix=".png", value=array)
