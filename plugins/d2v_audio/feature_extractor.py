"""The data2vec-audio feature encoder: raw waveform -> frame vectors (50 Hz for 16 kHz input).

A stack of strided 1-D convolutions, each followed by a LayerNorm over channels (with affine
parameters) and GELU -- fairseq's ``extractor_mode: layer_norm`` and Hugging Face's
``Data2VecAudioFeatureEncoder`` -- then a LayerNorm over the last conv width, a linear
projection to the encoder width and dropout (HF's ``Data2VecAudioFeatureProjection``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v import ExampleInputs, FeatureExtractor, FeatureExtractorOutput
from d2v.nn.layers import make_activation

class ConvBlock(nn.Module):
    """Conv1d -> LayerNorm over channels -> activation, on ``(B, C, T)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool, activation: str):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=kernel, stride=stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)  # as fairseq and Hugging Face initialise it
        self.norm = nn.LayerNorm(out_channels)
        self.activation = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.activation(x)


class ConvFeatureExtractor(FeatureExtractor):
    """Waveforms ``(B, S)`` -> features ``(B, T, dim)`` with the padding mask at frame rate.

    ``extract_features`` in the output is the LayerNormed conv output before the projection
    (``(B, T, conv_dim[-1])``), like Hugging Face's ``extract_features``.
    """

    def __init__(
        self,
        *,
        conv_dim: Sequence[int] = (512, 512, 512, 512, 512, 512, 512),
        conv_kernel: Sequence[int] = (10, 3, 3, 3, 3, 2, 2),
        conv_stride: Sequence[int] = (5, 2, 2, 2, 2, 2, 2),
        conv_bias: bool = False,
        activation: str = "gelu",
        dim: int = 768,
        feat_proj_dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
    ):
        #: the constructor arguments (what the Hugging Face exporter reads back)
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if not (len(conv_dim) == len(conv_kernel) == len(conv_stride)) or not conv_dim:
            raise SpecError(
                "conv_dim, conv_kernel and conv_stride must be non-empty and of the same length, got "
                f"{len(conv_dim)}, {len(conv_kernel)} and {len(conv_stride)} entries."
            )
        self.conv_dim = tuple(int(c) for c in conv_dim)
        self.conv_kernel = tuple(int(k) for k in conv_kernel)
        self.conv_stride = tuple(int(s) for s in conv_stride)
        self.dim = dim
        self.hparams = {**hparams, "conv_dim": list(self.conv_dim), "conv_kernel": list(self.conv_kernel),
                        "conv_stride": list(self.conv_stride)}

        in_channels = (1,) + self.conv_dim[:-1]
        self.conv_layers = nn.ModuleList(
            ConvBlock(c_in, c_out, k, s, conv_bias, activation)
            for c_in, c_out, k, s in zip(in_channels, self.conv_dim, self.conv_kernel, self.conv_stride)
        )
        self.norm = nn.LayerNorm(self.conv_dim[-1], eps=layer_norm_eps)
        self.proj = nn.Linear(self.conv_dim[-1], dim)
        self.dropout = nn.Dropout(feat_proj_dropout)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Number of frames the conv stack produces for inputs of ``lengths`` samples (no padding:
        ``floor((L - kernel) / stride) + 1`` per layer)."""
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths

    def receptive_field(self) -> int:
        """Samples one frame sees: the shortest input that yields a frame."""
        field, hop = 1, 1
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            field, hop = field + (kernel - 1) * hop, hop * stride
        return field

    def example_inputs(self, batch_size: int = 2, length: int | None = None, *, seed: int = 0) -> ExampleInputs:
        """Random waveforms, the first ``length`` samples long (default 16000), the others shorter
        and zero-padded (as the processor pads), with Hugging Face's ``attention_mask``."""
        length = int(length or 16000)
        shortest = 2 * self.receptive_field()
        if length < shortest:
            raise SpecError(f"audio.conv: example inputs need at least {shortest} samples, got {length}.")
        generator = torch.Generator().manual_seed(seed)
        waveforms = torch.randn(batch_size, length, generator=generator)
        attention_mask = torch.ones(batch_size, length, dtype=torch.long)
        for row in range(1, batch_size):
            real = max(shortest, length - row * length // (2 * batch_size))
            waveforms[row, real:] = 0.0
            attention_mask[row, real:] = 0
        axes = {0: "batch", 1: "samples"}
        return ExampleInputs({"input_values": waveforms, "attention_mask": attention_mask},
                             {"input_values": axes, "attention_mask": axes})

    def frame_padding_mask(self, padding_mask: Tensor, num_frames: int) -> Tensor:
        """The sample-rate ``padding_mask`` ``(B, S)`` brought to frame rate ``(B, num_frames)``.

        An example whose real length is shorter than the receptive field still keeps its first
        frame, so attention never sees a row with nothing to attend to.
        """
        lengths = self.output_lengths((~padding_mask).sum(-1)).clamp(min=1)
        frames = torch.arange(num_frames, device=padding_mask.device)
        return frames[None, :] >= lengths[:, None]

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> FeatureExtractorOutput:
        x = inputs[:, None, :]
        for block in self.conv_layers:
            x = block(x)
        x = x.transpose(1, 2)  # (B, T, C)

        frame_mask = None
        if padding_mask is not None:
            frame_mask = self.frame_padding_mask(padding_mask.bool(), x.shape[1])

        normed = self.norm(x)
        features = self.dropout(self.proj(normed))
        return FeatureExtractorOutput(features=features, padding_mask=frame_mask, extract_features=normed)
