"""A toy modality for testing core without any real plugin: vectors in, a linear target out.

Registered at test time with ``d2v.api.plugins.register_plugin(toy, "toy")``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from d2v import hookimpl
from d2v.api.interfaces import Encoder, EncoderOutput, FeatureExtractor, FeatureExtractorOutput, Head, HeadOutput


class ToyFeatures(FeatureExtractor):
    def __init__(self, *, in_dim: int = 4, dim: int = 8):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, inputs, padding_mask=None):
        return FeatureExtractorOutput(features=self.proj(inputs), padding_mask=padding_mask)


class ToyEncoder(Encoder):
    def __init__(self, *, dim: int = 8, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.dim, self.num_layers = dim, layers
        self.mask_embedding = nn.Parameter(torch.zeros(dim))
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout)) for _ in range(layers))

    def embed(self, features, padding_mask=None, mask=None):
        if mask is not None:
            features = torch.where(mask[..., None], self.mask_embedding.to(features.dtype), features)
        return features

    def contextualize(self, x, padding_mask=None, *, output_hidden_states=False, output_layer_targets=False,
                      target_feature="ffn", position_ids=None):
        hidden, targets = [x], []
        for layer in self.layers:
            ffn = layer(x)
            x = x + ffn
            hidden.append(x)
            targets.append(ffn if target_feature == "ffn" else x)
        return EncoderOutput(last_hidden_state=x, hidden_states=tuple(hidden) if output_hidden_states else None,
                             layer_targets=tuple(targets) if output_layer_targets else None, padding_mask=padding_mask)


class ToyRegressionHead(Head):
    """Predicts the per-example ``target`` vector from the mean of the sequence."""

    def __init__(self, *, input_dim: int, out_dim: int = 2):
        super().__init__()
        self.proj = nn.Linear(input_dim, out_dim)

    def forward(self, encoder_output, batch):
        logits = self.proj(encoder_output.last_hidden_state.mean(1))
        loss = nn.functional.mse_loss(logits, batch["target"]) if "target" in batch else None
        return HeadOutput(logits=logits, loss=loss)

    def predict(self, output, batch):
        return output.logits.tolist()

    def eval_counts(self, output, batch):
        return {"sq_error": float(((output.logits - batch["target"]) ** 2).sum()), "n": float(len(batch["target"]))}

    def summarize(self, counts):
        return {"mse": counts["sq_error"] / max(1.0, counts["n"])}

    def references(self, batch):
        return batch["target"].tolist()


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, *, size: int = 64, length: int = 5, in_dim: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(size, length, in_dim)).astype("float32")
        w = np.linspace(-1, 1, in_dim * 2).reshape(in_dim, 2).astype("float32")
        self.y = self.x.mean(1) @ w
        self.lengths = [length] * size

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"id": f"toy-{i}", "x": self.x[i], "y": self.y[i]}


class ToyProcessor:
    def __init__(self, *, noise: float = 0.0):
        self.noise = noise

    def load(self, example, *, train, rng=None):
        x = example["x"]
        if train and self.noise and rng is not None:
            x = x + rng.normal(scale=self.noise, size=x.shape).astype("float32")
        return {**example, "x": x}

    def collate(self, examples):
        return {"inputs": torch.tensor(np.stack([e["x"] for e in examples])),
                "target": torch.tensor(np.stack([e["y"] for e in examples])),
                "ids": [e["id"] for e in examples]}


@hookimpl
def d2v_register(register):
    register("feature_extractor", "toy.features", ToyFeatures, summary="toy")
    register("encoder", "toy.encoder", ToyEncoder, summary="toy")
    register("head", "toy_regression", ToyRegressionHead, summary="toy")
    register("dataset", "toy", ToyDataset, summary="toy")
    register("processor", "toy", ToyProcessor, summary="toy")


def toy_spec(output_dir, **trainer):
    return {
        "task": "finetune",
        "seed": 3,
        "model": {"feature_extractor": {"name": "toy.features"}, "encoder": {"name": "toy.encoder"},
                  "head": {"name": "toy_regression"}},
        "data": {"processor": {"name": "toy", "noise": 0.1}, "train": {"name": "toy"},
                 "valid": {"name": "toy", "size": 16, "seed": 1}, "loader": {"batch_size": 8}},
        "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
        "schedule": {"name": "tri_stage", "phase_ratio": [0.1, 0.4, 0.5]},
        "trainer": {"output_dir": str(output_dir), "max_steps": 12, "log_every": 1, "progress_bar": False, **trainer},
    }
