"""fairseq-produced text fixtures: data2vec 1.0 and 2.0 text pretraining and their GLUE classifiers.

Each family builds a tiny random model with fairseq's own config dataclasses, task and ``Trainer``,
trains it for a few updates (so an EMA teacher and Adam state exist), saves it with
``Trainer.save_checkpoint`` and records what fairseq computes on fixed padded batches:

* ``text1``: ``data2vec_text`` on ``masked_lm`` -- encoder output (eval), and for the next update
  (train mode, dropout 0) on a batch with fixed ``<mask>`` positions: teacher targets, regression
  head predictions, summed loss and sample size;
* ``text1_preln``: ``data2vec_text`` with ``normalize_before: true`` (d2v refuses it);
* ``text1_cls``: a RoBERTa ``sentence_prediction`` classifier (the recipe fairseq's data2vec README
  gives for GLUE fine-tuning of data2vec text 1.0) -- logits (eval);
* ``text1_cls_d2v``: the same fine-tuning kept as ``data2vec_text`` with its classification head;
* ``text2``: ``data2vec_multi`` with the TEXT modality on ``masked_lm`` -- encoder output (eval),
  and for the next update on an unpadded batch (as fairseq's text pretraining batches are) under a
  precomputed mask: targets, decoder predictions, loss, sample size;
* ``text2_variant``: the same with a residual one-projection decoder, the EMA of the whole model and
  layer-normed targets;
* ``text2_cls``: ``data2vec_text_classification`` on ``sentence_prediction`` over the ``text2``
  checkpoint (its cfg keeps only ``model_path``, as fairseq saves it) -- logits (eval);
* ``text2_preln``: a ``data2vec_multi`` text checkpoint with ``layer_norm_first: true`` (d2v refuses it).

Dropouts are 0 and ``mask_noise_std`` is 0 so the recorded update is deterministic.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

import oracle_trainer as ot

PAD, BOS, EOS = 1, 0, 2
WORDS = 40                       # dict.txt lines: 4 specials + 40 words + <mask> = 45 ids
LENGTHS = (12, 9, 6)             # a padded batch
TOKENS_PER_SAMPLE = 32
CLASSES = 3


def write_dict(folder: Path, words: int = WORDS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dict.txt"
    path.write_text("".join(f"w{i} {1000 - i}\n" for i in range(words)))
    return path


def padded_tokens(vocab: int, seed: int, lengths=LENGTHS) -> torch.Tensor:
    """``<s> ... </s>`` rows of ordinary words, right-padded with fairseq's pad id."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        rows[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        rows[i, 0], rows[i, n - 1] = BOS, EOS
    return rows


def inner_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Positions that hold a word (not ``<s>``, ``</s>`` or padding)."""
    return tokens.ne(PAD) & tokens.ne(BOS) & tokens.ne(EOS)


@contextlib.contextmanager
def temp_data():
    folder = Path(tempfile.mkdtemp(prefix="fairseq_text_"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- data2vec 1.0


def text1_model_args(**extra) -> dict:
    """A 16-wide, 2-layer RoBERTa encoder with the released recipe's objective (nlp base.yaml)."""
    return {
        "head_layers": 2, "average_top_k_layers": 2, "layer_norm_target_layer": True, "loss_scale": 1.0,
        "loss_beta": 4.0, "ema_decay": 0.99, "ema_end_decay": 0.999, "ema_anneal_end_step": 20,
        "ema_transformer_layers_only": True,
        "transformer.dropout": 0.0, "transformer.attention_dropout": 0.0, "transformer.activation_dropout": 0.0,
        "transformer.layernorm_embedding": True, "transformer.activation_fn": "gelu",
        "transformer.no_scale_embedding": True, "transformer.max_source_positions": TOKENS_PER_SAMPLE,
        # TransformerConfig's decoder fields interpolate model.decoder.embed_dim, absent from an encoder-only model
        "transformer.decoder.input_dim": 512, "transformer.decoder.output_dim": 512,
        "transformer.encoder.embed_dim": 16, "transformer.encoder.ffn_embed_dim": 32,
        "transformer.encoder.layers": 2, "transformer.encoder.attention_heads": 4,
        "transformer.encoder.normalize_before": False, "transformer.encoder.learned_pos": True, **extra,
    }


def masked_lm_args(data: Path, **extra) -> dict:
    return {"data": str(data), "tokens_per_sample": TOKENS_PER_SAMPLE, "include_target_tokens": True,
            "random_token_prob": 0.0, "leave_unmasked_prob": 0.0, "mask_prob": 0.35, "mask_multiple_length": 4,
            **extra}


def bert_masked(tokens: torch.Tensor, mask_idx: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The corrupted input (35% of the words replaced by ``<mask>``, at least one per row) and the mask."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(tokens.shape, generator=g) < 0.35) & inner_positions(tokens)
    mask[:, 1] = True
    return tokens.masked_fill(mask, mask_idx), mask


def text1_sample(tokens: torch.Tensor, corrupted: torch.Tensor) -> dict:
    return {"id": torch.arange(len(tokens)),
            "net_input": {"src_tokens": corrupted, "target_tokens": tokens, "src_lengths": tokens.ne(PAD).sum(1)},
            "ntokens": int(tokens.ne(PAD).sum()), "nsentences": len(tokens), "target": tokens}


class RecordedRegression:
    """Records the (prediction, target) pair data2vec_text passes to its regression loss."""

    def __init__(self, module):
        self.module, self.functional = module, module.F
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __getattr__(self, name):
        value = getattr(self.functional, name)
        if name not in ("mse_loss", "smooth_l1_loss"):
            return value

        def recorded(x, y, *args, **kwargs):
            self.pairs.append((x.detach().clone(), y.detach().clone()))
            return value(x, y, *args, **kwargs)

        return recorded

    def __enter__(self):
        self.module.F = self
        return self

    def __exit__(self, *exc):
        self.module.F = self.functional


def text1(out: Path) -> None:
    import examples.data2vec.models.data2vec_text as fairseq_text

    torch.manual_seed(1)
    with temp_data() as data:
        write_dict(data)
        cfg = ot.fairseq_config("masked_lm", masked_lm_args(data), "data2vec_text", text1_model_args())
        task, model, criterion, trainer = ot.build(cfg)
        vocab, mask_idx = len(task.source_dictionary), task.mask_idx
        for step in range(3):
            tokens = padded_tokens(vocab - 1, seed=100 + step)
            trainer.train_step([text1_sample(tokens, bert_masked(tokens, mask_idx, seed=step)[0])])
        ot.save(trainer, str(out / "checkpoint.pt"))

        tokens = padded_tokens(vocab - 1, seed=7)
        corrupted, mask = bert_masked(tokens, mask_idx, seed=8)
        model.eval()
        with torch.no_grad():
            features, _ = model(tokens, features_only=True)
        model.train()
        with torch.no_grad(), RecordedRegression(fairseq_text) as recorded:
            loss, sample_size, _ = criterion(model, text1_sample(tokens, corrupted))
        (predictions, targets), = recorded.pairs
        ema_step = recorded_ema_step(model.encoder, trainer.get_num_updates() + 1,
                                     averaged="layers.1.fc1.weight", copied="embed_tokens.weight")
    torch.save({"tokens": tokens, "encoder_out": features, "masked_tokens": corrupted, "mask": mask,
                "targets": targets, "predictions": predictions, "loss": float(loss), "sample_size": int(sample_size),
                "num_updates": trainer.get_num_updates(), "vocab": vocab, "mask_idx": mask_idx, **ema_step},
               out / "outputs.pt")


def recorded_ema_step(module, num_updates: int, averaged: str, copied: str | None = None) -> dict:
    """The EMA step fairseq takes after the next update (``set_num_updates``), with the student
    unchanged: the annealed decay and two teacher tensors, one averaged and one copied."""
    module.set_num_updates(num_updates)
    params = module.ema.fp32_params
    step = {"ema_decay": float(module.ema.get_decay()), "teacher_averaged": params[averaged].clone()}
    if copied is not None:
        step["teacher_copied"] = params[copied].clone()
    return step


def text1_preln(out: Path) -> None:
    """``normalize_before: true`` (pre-LN layers and a final LayerNorm), which d2v refuses; saved untrained."""
    torch.manual_seed(8)
    with temp_data() as data:
        write_dict(data)
        cfg = ot.fairseq_config("masked_lm", masked_lm_args(data), "data2vec_text",
                                text1_model_args(**{"transformer.encoder.normalize_before": True}))
        ot.save(ot.build(cfg)[3], str(out / "checkpoint.pt"))


# --------------------------------------------------------------------------- classifiers


def sentence_prediction_data(folder: Path) -> Path:
    """What ``sentence_prediction``'s ``setup_task`` reads: ``input0/dict.txt`` and ``label/dict.txt``."""
    write_dict(folder / "input0")
    (folder / "label").mkdir(parents=True, exist_ok=True)
    (folder / "label" / "dict.txt").write_text("".join(f"{i} 10\n" for i in range(CLASSES)))
    return folder


def classifier_sample(tokens: torch.Tensor, d2v2: bool) -> dict:
    labels = torch.arange(len(tokens)) % CLASSES
    if d2v2:
        net_input = {"source": tokens, "id": torch.arange(len(tokens)), "padding_mask": tokens.eq(PAD)}
    else:
        net_input = {"src_tokens": tokens, "src_lengths": tokens.ne(PAD).sum(1)}
    return {"id": torch.arange(len(tokens)), "net_input": net_input, "target": labels,
            "ntokens": int(tokens.ne(PAD).sum()), "nsentences": len(tokens)}


def classifier_logits(model, tokens: torch.Tensor, d2v2: bool) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        inputs = classifier_sample(tokens, d2v2)["net_input"]
        logits, _ = model(**inputs, features_only=True, classification_head_name="sentence_classification_head")
    return logits


def train_classifier(task_args: dict, model_name: str, model_args: dict, d2v2: bool, out: Path) -> None:
    registered = model_name != "roberta"
    cfg = ot.fairseq_config("sentence_prediction", {"num_classes": CLASSES, "max_positions": TOKENS_PER_SAMPLE,
                                                    "d2v2_multi": d2v2, **task_args},
                            model_name if registered else "data2vec_text", model_args if registered else {},
                            criterion="sentence_prediction")
    if not registered:  # RoBERTa is a legacy (argparse) model: its cfg.model is a flat node its arch fills in
        cfg.model = OmegaConf.create({"_name": model_name, "arch": model_name, **model_args})
    task, model, _, trainer = ot.build(cfg)
    vocab = len(task.source_dictionary)
    for step in range(2):
        trainer.train_step([classifier_sample(padded_tokens(vocab - 1, seed=200 + step), d2v2)])
    ot.save(trainer, str(out / "checkpoint.pt"))
    tokens = padded_tokens(vocab - 1, seed=9)
    torch.save({"tokens": tokens, "logits": classifier_logits(model, tokens, d2v2),
                "num_classes": CLASSES, "vocab": vocab}, out / "outputs.pt")


def text1_cls(out: Path) -> None:
    """fairseq's README: data2vec text 1.0 is fine-tuned on GLUE with examples/roberta/config/finetuning
    (``_name: roberta``, ``sentence_prediction``) restoring the pretraining checkpoint."""
    torch.manual_seed(2)
    with temp_data() as data:
        model_args = {"encoder_layers": 2, "encoder_embed_dim": 16, "encoder_ffn_embed_dim": 32,
                      "encoder_attention_heads": 4, "max_positions": TOKENS_PER_SAMPLE, "dropout": 0.0,
                      "attention_dropout": 0.0, "pooler_dropout": 0.0}
        train_classifier({"data": str(sentence_prediction_data(data))}, "roberta", model_args, False, out)
    write_dict(out)


def text1_cls_d2v(out: Path) -> None:
    """The same fine-tuning with the model kept as ``data2vec_text`` (its own classification heads)."""
    torch.manual_seed(7)
    with temp_data() as data:
        model_args = text1_model_args(load_checkpoint_heads=True)
        train_classifier({"data": str(sentence_prediction_data(data))}, "data2vec_text", model_args, False, out)
    write_dict(out)


# --------------------------------------------------------------------------- data2vec 2.0


def text2_model_args(**extra) -> dict:
    """base_text_only_task.yaml at 16 wide, 2 blocks, 2 clones per sample, dropouts and mask noise 0."""
    return {
        "loss_beta": 0.0, "loss_scale": 1.0, "depth": 2, "embed_dim": 16, "num_heads": 4, "mlp_ratio": 2.0,
        "clone_batch": 2, "norm_eps": 1e-5, "ema_decay": 0.99, "ema_end_decay": 0.999, "ema_anneal_end_step": 20,
        "ema_encoder_only": True, "average_top_k_layers": 2, "instance_norm_target_layer": True,
        "encoder_dropout": 0.0, "post_mlp_drop": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "dropout_input": 0.0, "layerdrop": 0.0, "supported_modality": "TEXT",
        "modalities.text.mask_prob": 0.48, "modalities.text.mask_length": 1, "modalities.text.mask_noise_std": 0.0,
        "modalities.text.prenet_depth": 0, "modalities.text.dropout": 0.0,
        "modalities.text.max_source_positions": TOKENS_PER_SAMPLE,
        "modalities.text.decoder.input_dropout": 0.0, "modalities.text.decoder.decoder_dim": 16,
        "modalities.text.decoder.decoder_groups": 1, "modalities.text.decoder.decoder_kernel": 5,
        "modalities.text.decoder.decoder_layers": 2, "modalities.text.decoder.decoder_residual": False,
        "modalities.text.decoder.projection_layers": 2, **extra,
    }


def text2_task_args(data: Path) -> dict:
    return masked_lm_args(data, sample_break_mode="none", include_index=True, skip_masking=True, d2v2_multi=True)


def text2_sample(tokens: torch.Tensor, precomputed_mask: torch.Tensor | None = None) -> dict:
    net_input = {"source": tokens, "id": torch.arange(len(tokens)), "padding_mask": tokens.eq(PAD)}
    if precomputed_mask is not None:
        net_input["precomputed_mask"] = precomputed_mask
    return {"id": torch.arange(len(tokens)), "net_input": net_input, "ntokens": int(tokens.ne(PAD).sum()),
            "nsentences": len(tokens)}


def clone_masks(tokens: torch.Tensor, clones: int, per_row: int, seed: int) -> torch.Tensor:
    """``(B * clones, T)`` masks, ``per_row`` words each (fairseq's MaskInfo needs the same count
    in every row), clones of a sample consecutive as ``repeat_interleave`` orders them."""
    g = torch.Generator().manual_seed(seed)
    words = inner_positions(tokens).repeat_interleave(clones, 0)
    mask = torch.zeros_like(words)
    for row in range(len(words)):
        candidates = words[row].nonzero().flatten()
        mask[row, candidates[torch.randperm(len(candidates), generator=g)[:per_row]]] = True
    return mask


class RecordedTargets:
    """Records what ``make_targets`` returns (the teacher's targets, per sample) and what the
    text decoder outputs (the predictions at every position of every clone)."""

    def __init__(self, model):
        self.model, self.targets, self.decoded = model, [], []
        self.make_targets = model.make_targets

    def __enter__(self):
        def make_targets(y, num_layers):
            self.targets.append(self.make_targets(y, num_layers).detach().clone())
            return self.targets[-1]

        self.model.make_targets = make_targets
        decoder = self.model.modality_encoders["TEXT"].decoder
        self.hook = decoder.register_forward_hook(lambda m, i, o: self.decoded.append(o.detach().clone()))
        return self

    def __exit__(self, *exc):
        del self.model.make_targets
        self.hook.remove()


def train_text2(data: Path, model_args: dict, out: Path, updates: int = 3):
    write_dict(data)
    cfg = ot.fairseq_config("masked_lm", text2_task_args(data), "data2vec_multi", model_args)
    task, model, criterion, trainer = ot.build(cfg)
    vocab = len(task.source_dictionary)
    for step in range(updates):
        trainer.train_step([text2_sample(padded_tokens(vocab - 1, seed=300 + step))])
    ot.save(trainer, str(out / "checkpoint.pt"))
    write_dict(out)
    return task, model, criterion, trainer, vocab


def text2(out: Path, seed: int = 3, **model_args) -> None:
    torch.manual_seed(seed)
    with temp_data() as data:
        args = text2_model_args(**model_args)
        task, model, criterion, trainer, vocab = train_text2(data, args, out)
        tokens = padded_tokens(vocab - 1, seed=11)
        model.eval()
        with torch.no_grad():
            features = model(tokens, padding_mask=tokens.eq(PAD), mask=False, features_only=True)["x"]
        # fairseq's text pretraining batches are unpadded blocks (sample_break_mode none); on padded
        # ones it normalises targets over padding and feeds padding to the decoder, which d2v does not
        unpadded = padded_tokens(vocab - 1, seed=13, lengths=(12, 12, 12))
        clones = args["clone_batch"]
        mask = clone_masks(unpadded, clones, per_row=4, seed=12)
        model.train()
        with torch.no_grad(), RecordedTargets(model) as recorded:
            loss, sample_size, _ = criterion(model, text2_sample(unpadded, mask))
        (targets,), (decoded,) = recorded.targets, recorded.decoded
        prefix = "" if args["ema_encoder_only"] else "blocks."
        ema_step = recorded_ema_step(model, trainer.get_num_updates() + 1, averaged=f"{prefix}1.mlp.fc1.weight")
    torch.save({"tokens": tokens, "encoder_out": features, "update_tokens": unpadded, **ema_step,
                "mask": mask.view(len(unpadded), clones, -1),
                "targets": targets.repeat_interleave(clones, 0)[mask], "predictions": decoded[mask],
                "loss": float(loss), "sample_size": int(sample_size), "num_updates": trainer.get_num_updates(),
                "vocab": vocab}, out / "outputs.pt")


def text2_variant(out: Path) -> None:
    """The other decoder (residual convolutions, one projection), the EMA of the whole model
    (``ema_encoder_only: false``) and layer-normed targets."""
    text2(out, seed=6, ema_encoder_only=False, instance_norm_target_layer=False, layer_norm_target_layer=True,
          layer_norm_targets=True, **{"modalities.text.decoder.decoder_residual": True,
                                      "modalities.text.decoder.projection_layers": 1,
                                      "modalities.text.decoder.decoder_kernel": 3,
                                      "modalities.text.decoder.decoder_groups": 4})


def text2_preln(out: Path) -> None:
    """``layer_norm_first: true`` (pre-LN blocks), which d2v's post-LN text encoder refuses."""
    torch.manual_seed(4)
    with temp_data() as data:
        train_text2(data, text2_model_args(layer_norm_first=True), out, updates=0)  # saved untrained: smaller


def text2_cls(out: Path) -> None:
    """fairseq's 2.0 GLUE recipe (config/v2/text_finetuning): ``data2vec_text_classification`` with
    ``model_path`` = the pretraining checkpoint (here fixtures/text2/checkpoint.pt, which must exist);
    the saved cfg has ``pretrained_model_args: null``, as fairseq writes it."""
    backbone = out.parent / "text2" / "checkpoint.pt"
    if not backbone.is_file():
        raise SystemExit(f"text2_cls needs {backbone}: make the text2 fixture first")
    torch.manual_seed(5)
    with temp_data() as data:
        write_dict(data)  # the pretraining task's data folder, which fairseq re-creates from model_path's cfg
        state = torch.load(backbone, weights_only=False)
        state["cfg"]["task"]["data"] = str(data)
        pretrained = data / "pretrained.pt"
        torch.save(state, pretrained)
        train_classifier({"data": str(sentence_prediction_data(data))}, "data2vec_text_classification",
                         {"model_path": str(pretrained), "pooler_dropout": 0.0}, True, out)
    write_dict(out)


FAMILIES = {"text1": text1, "text1_preln": text1_preln, "text1_cls": text1_cls, "text1_cls_d2v": text1_cls_d2v,
            "text2": text2, "text2_variant": text2_variant, "text2_cls": text2_cls, "text2_preln": text2_preln}
