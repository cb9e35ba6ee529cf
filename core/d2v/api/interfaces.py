"""The four abstract parts every d2v model is built from.

A model is ``FeatureExtractor -> Encoder -> Head`` (fine-tuning) or
``FeatureExtractor -> Encoder -> regression head`` with a ``Target`` computed from an EMA
teacher (self-supervised pretraining). Plugins implement these; core composes them and
never needs to know which modality it is running.

Conventions shared by every implementation:

* ``padding_mask`` is a bool tensor, ``True`` where a position is padding (fairseq's
  convention; the Hugging Face compatible wrappers convert ``attention_mask`` to it).
* ``mask`` (the self-supervised / SpecAugment mask) is a bool tensor, ``True`` where a
  position is masked, i.e. replaced by the learned mask embedding.
* Output field names follow Hugging Face so users find what they expect.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor, nn

from d2v.api.errors import SpecError


class _Output:
    """Dataclass mixin: attribute and ``out["key"]`` access, like HF's ``ModelOutput``."""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())


@dataclass
class FeatureExtractorOutput(_Output):
    """What a feature extractor hands to the encoder.

    features: ``(B, T, D)`` vectors at the encoder's rate and width.
    padding_mask: ``(B, T)`` bool, True at padded positions (``None`` = nothing padded).
    extract_features: the modality's features before the projection to ``D`` (HF's
        ``extract_features``, e.g. the conv encoder output after its LayerNorm), if any.
    encoder_context: keyword arguments the encoder needs about these features, passed on by
        :class:`d2v.spec.model.TaskModel` (images: ``grid_size``, the batch's patch grid, which the
        token count alone cannot tell for a non-square image).
    """

    features: Tensor
    padding_mask: Tensor | None = None
    extract_features: Tensor | None = None
    encoder_context: dict[str, Any] | None = None


@dataclass
class ExampleInputs:
    """A padded example batch a feature extractor takes, under Hugging Face's input names: what
    ONNX export traces the model with and checks the exported graph on.

    tensors: the model input first (``input_values``, ``input_ids``, ``pixel_values``), then
        ``attention_mask`` (int64, 1 = real, 0 = padding) where the modality pads.
    dynamic_axes: per tensor, the axes whose size may change (axis -> name, e.g.
        ``{0: "batch", 1: "samples"}``); other axes are fixed in the exported graph.
    """

    tensors: dict[str, Tensor]
    dynamic_axes: dict[str, dict[int, str]]


@dataclass
class EncoderOutput(_Output):
    """What an encoder returns.

    last_hidden_state: ``(B, T, D)``.
    hidden_states: ``num_layers + 1`` tensors (the encoder input after its positional
        scheme, then each layer's output), as Hugging Face's ``output_hidden_states``.
    layer_targets: one ``(B, T, D)`` tensor per layer: the feature data2vec regresses,
        chosen by ``target_feature`` (see :class:`Encoder`).
    padding_mask: the padding mask the encoder used (``None`` = nothing padded).
    pooler_output: ``(B, D)`` summary vector when the encoder has a pooler (text: dense +
        tanh over the first token; vision: mean pooling), as Hugging Face's ``pooler_output``.
    past_key_values: the key/value cache after this call, for encoders that decode
        incrementally (text ``is_decoder``); ``None`` otherwise.
    """

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    layer_targets: tuple[Tensor, ...] | None = None
    padding_mask: Tensor | None = None
    pooler_output: Tensor | None = None
    past_key_values: Any = None


@dataclass
class HeadOutput(_Output):
    """What a head returns: ``logits`` always, ``loss`` when labels were given, and ``extras``:
    named tensors its ``predict``/``eval_counts``/``describe`` or the Hugging Face converters need
    besides the logits (e.g. CTC's ``output_lengths``, an x-vector's ``embeddings``)."""

    logits: Tensor
    loss: Tensor | None = None
    extras: dict[str, Tensor] | None = None


@dataclass
class ResultFile:
    """A prediction that is a file rather than a JSON value (a segmentation mask as PNG).

    ``data``: the file's bytes; ``suffix``: its extension (``".png"``); ``value``: the same
    result in memory for Python callers (e.g. the class-id array). ``d2v predict`` writes
    ``data`` beside its JSON lines and puts the file's path in their place.
    """

    data: bytes
    suffix: str
    value: Any = None

    def save(self, path: str | Any) -> None:
        with open(path, "wb") as handle:
            handle.write(self.data)


class FeatureExtractor(nn.Module, abc.ABC):
    """Raw modality input -> a sequence of vectors (conv encoder, embeddings, patches).

    Implementations set ``self.dim`` (the width ``D`` of ``features``).

    ``batch_keys`` names extra batch entries the component reads, passed to ``forward`` as
    keyword arguments when present (text: ``token_type_ids``, ``position_ids``,
    ``past_key_values``). A feature extractor with an input embedding table returns it from
    ``input_embeddings()`` so heads can tie their output layer to it (see :class:`Head`).
    """

    dim: int
    batch_keys: tuple[str, ...] = ()

    @abc.abstractmethod
    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> FeatureExtractorOutput:
        """Return features ``(B, T, D)`` and the padding mask at feature rate.

        ``inputs``: a padded batch of raw inputs (waveforms ``(B, S)``, token ids ``(B, S)``,
        images ``(B, C, H, W)``); ``padding_mask``: ``(B, S)`` bool, True at padding. Sequences
        with channels put time on axis 1, ``(B, S, C)``: data2vec 2.0's mask sampler counts the
        feature positions of a sequence from ``inputs.shape[1]`` (images use ``grid_size``).
        """

    def example_inputs(self, batch_size: int = 2, length: int | None = None, *, seed: int = 0) -> ExampleInputs:
        """A random padded batch of ``batch_size`` examples, the first ``length`` long (the
        modality's unit: samples, tokens; ``None``: a small default; ignored where the input size
        is fixed) and the others shorter where the modality pads. Optional: ``d2v export --onnx``
        needs it to trace the model."""
        raise SpecError(f"{type(self).__name__} does not provide example_inputs(batch_size, length), which ONNX "
                        f"export needs to trace the model; its plugin must implement it (see docs/writing-a-plugin.md).")


class Encoder(nn.Module, abc.ABC):
    """The contextualising Transformer stack, with its positional scheme.

    Implementations set ``self.dim`` and ``self.num_layers`` and own a learned
    ``mask_embedding`` used wherever ``mask`` is True.

    ``target_feature`` names the per-layer feature returned in ``layer_targets``:

    * ``"ffn"``: the FFN output before the last residual connection (and before the
      post-LN layer norm) -- data2vec's target for speech, text and data2vec 2.0;
    * ``"end"``: the block's output (after the residual) -- data2vec 1.0 vision.

    The Transformer blocks are named by :meth:`transformer_blocks` (default: ``self.layers``, an
    ``nn.ModuleList``) and called through :func:`d2v.nn.layers.run_layer`: that is what
    ``trainer.gradient_checkpointing`` (recompute a block's activations in backward),
    ``trainer.compile`` (``torch.compile`` each block) and FSDP (one shard unit per block) act on.
    """

    dim: int
    num_layers: int
    #: recompute each block's activations in the backward pass (set by ``trainer.gradient_checkpointing``)
    gradient_checkpointing: bool = False
    #: extra batch entries passed to ``forward`` as keyword arguments when present (text
    #: decoders: ``encoder_hidden_states``, ``encoder_attention_mask``, ``past_key_values``,
    #: ``use_cache``); ``forward`` hands them to :meth:`contextualize`.
    batch_keys: tuple[str, ...] = ()

    def transformer_blocks(self) -> nn.ModuleList:
        """The Transformer blocks, in order: the one place the runner learns them from, for
        activation checkpointing, ``torch.compile`` and FSDP's per-block shard units alike. The
        default is ``self.layers``; an encoder that keeps its blocks elsewhere overrides this."""
        layers = getattr(self, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise SpecError(
                f"{type(self).__name__} has no Transformer blocks d2v can find: trainer.gradient_checkpointing, "
                "trainer.compile and FSDP act on the blocks in 'self.layers' (an nn.ModuleList) or those its "
                "transformer_blocks() returns; turn the option off or give the encoder one (docs/writing-a-plugin.md)."
            )
        return layers

    @abc.abstractmethod
    def embed(self, features: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Everything before the Transformer layers: mask embedding where ``mask`` is True,
        then the positional scheme (and the input LayerNorm/dropout where the architecture
        has them). Returns ``(B, T, D)``.

        data2vec 2.0 calls this, drops the masked positions, and runs :meth:`contextualize`
        on the kept tokens only.
        """

    @abc.abstractmethod
    def contextualize(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_layer_targets: bool = False,
        target_feature: str = "ffn",
        position_ids: Tensor | None = None,
    ) -> EncoderOutput:
        """Run the Transformer layers on ``x`` ``(B, T', D)`` (the output of :meth:`embed`,
        possibly a subset of its positions). ``position_ids`` ``(B, T')`` gives the original
        position of each kept token, for positional schemes applied inside the layers
        (e.g. relative position bias); ``None`` means ``0..T'-1``.
        """

    def forward(
        self,
        features: Tensor,
        padding_mask: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_layer_targets: bool = False,
        target_feature: str = "ffn",
        **context: Any,
    ) -> EncoderOutput:
        """Contextualise ``features`` ``(B, T, D)``: :meth:`embed` then :meth:`contextualize`.

        Positions where ``mask`` is True are replaced by the mask embedding before the
        positional scheme. Padding never attends and is never attended to. ``context``: the
        :attr:`batch_keys` entries of the batch, passed on to :meth:`contextualize`.
        """
        x = self.embed(features, padding_mask, mask)
        return self.contextualize(
            x,
            padding_mask,
            output_hidden_states=output_hidden_states,
            output_layer_targets=output_layer_targets,
            target_feature=target_feature,
            **context,
        )


class Head(nn.Module, abc.ABC):
    """A task on top of the encoder: logits, loss, predictions and metrics.

    Evaluation is split in two so it works across processes: :meth:`eval_counts` returns
    additive counts for one batch (summed over batches and processes by the runner), and
    :meth:`summarize` turns the totals into metrics (e.g. word errors / words = WER).

    Optional hooks, read by :class:`d2v.spec.model.TaskModel`:

    * ``needs_hidden_states = True``: the encoder is asked for every layer's output
      (``encoder_output.hidden_states``), e.g. for a learned weighted sum of layers;
    * ``tie_input_embeddings(embedding)``: called once with the feature extractor's
      ``input_embeddings()`` so an output layer shares the input embedding matrix (masked LM);
    * ``prepare_batch(batch) -> batch``: reshape the inputs before encoding (multiple choice
      folds ``(B, C, S)`` choices into ``(B*C, S)`` rows).

    And by the runner: ``inspect_examples(examples) -> list[str]``: called once per split with
    the dataset's light examples (no audio or pixels loaded) before training; each returned line
    is printed and logged as a data warning (CTC reports transcript characters its vocabulary
    lacks). A dataset with ``light_example(i)`` hands over examples without their files.

    And by :mod:`d2v.pipeline` (``d2v predict``), all optional:

    * ``tasks``: the pipeline task names the head serves, the default first (e.g.
      ``("image-classification",)``); a head without them serves one task named after it;
    * :meth:`describe`: rich per-example results (top-k labels with scores, spans, masks);
    * ``predict_step(model, batch, *, task, top_k, decode, **options) -> list[dict]``: the
      whole inference for a batch when one forward pass is not enough (text generation);
    * ``pair_tasks`` + ``score_pair(first, second) -> dict``: tasks whose inputs are pairs of
      examples, scored from their two :meth:`describe` results (speaker verification).
    """

    needs_hidden_states: bool = False
    tasks: tuple[str, ...] = ()
    pair_tasks: tuple[str, ...] = ()

    @abc.abstractmethod
    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any]) -> HeadOutput:
        """Return logits, and the loss when ``batch`` carries labels."""

    @abc.abstractmethod
    def predict(self, output: HeadOutput, batch: dict[str, Any]) -> list[Any]:
        """Turn logits into one prediction per example (e.g. CTC decoding to text)."""

    @abc.abstractmethod
    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, float]:
        """Additive evaluation counts for one batch (e.g. word edits and reference words).

        Numbers are summed over batches and processes; a list value (per-example values a
        metric needs whole, e.g. scores for Spearman's rho or an EER) is concatenated."""

    @abc.abstractmethod
    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        """Metrics from counts summed over the whole evaluation set."""

    def references(self, batch: dict[str, Any]) -> list[Any]:
        """The ground truth per example, written next to predictions by ``task: evaluate``."""
        return [None] * len(batch.get("ids", []))

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5,
                 decode: Any = None) -> list[dict[str, Any]]:
        """One JSON-ready dict per example for ``d2v predict`` (default: ``{"prediction": ...}``
        from :meth:`predict`). ``top_k``: how many candidates to list where a head ranks them;
        ``decode``: the processor's ``decode(token_ids) -> str`` when it has one, for heads that
        predict tokens. A value that is a file (a segmentation mask) is a :class:`ResultFile`."""
        return [{"prediction": value} for value in self.predict(output, batch)]


class Target(nn.Module, abc.ABC):
    """What a self-supervised student regresses, and the loss that compares them.

    The teacher's ``EncoderOutput`` (with ``layer_targets``) goes in; targets at the masked
    positions come out, so students never see the answer for what they could observe.

    data2vec 2.0 (``objective: data2vec2``) also needs ``make_decoder(kind, input_dim, grid=...,
    **options)`` (the student's decoder) and uses, when present, ``build(teacher_output,
    skip_tokens) -> (B, T, D)`` (targets for every position, built once for all masked clones)
    and ``reduction`` (``"sum"`` or ``"mean"`` of the per-token loss); see docs/writing-a-plugin.md.
    """

    @abc.abstractmethod
    def forward(self, teacher_output: EncoderOutput, mask: Tensor) -> Tensor:
        """Targets ``(N, D)`` for the ``N`` masked positions of ``mask`` ``(B, T)``."""

    @abc.abstractmethod
    def loss(self, prediction: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss for ``prediction`` vs ``target`` (both ``(N, D)``), plus statistics
        worth logging (e.g. target and prediction standard deviation)."""

