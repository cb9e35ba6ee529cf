"""Causal language modelling: Hugging Face's ``Data2VecTextForCausalLM`` head, loss and generation.

The LM layer of :mod:`d2v_heads.text.lm_head` on a decoder encoder (``model.encoder.is_decoder:
true``); the loss is HF's ``ForCausalLMLoss``: labels shifted left by one (position ``t``
predicts token ``t + 1``), -100 ignored, float32 cross-entropy averaged over the remaining
tokens. Labels come from ``batch["labels"]``, or else the inputs with padding set to -100.

Spec usage::

    head: {name: causal_lm}

Metrics: ``perplexity`` (``exp`` of the token-weighted mean NLL over the evaluation set, from
additive sums) and ``next_token_accuracy`` (percent). ``predict`` gives the most probable token
after each example's last real token.

:func:`generate` decodes step by step with the encoder's key/value cache (greedy or top-k /
top-p sampling); see its docstring for the padding it supports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from d2v import hookimpl
from d2v.api.errors import SpecError
from d2v import EncoderOutput, HeadOutput
from d2v_heads.text.lm_head import IGNORE_INDEX, LanguageModelHead, perplexity, token_nll


@hookimpl
def d2v_register(register):
    register("head", "causal_lm", "d2v_heads.text.causal_lm:CausalLMHead",
             summary="causal LM (HF Data2VecTextForCausalLM: LM head tied to the embeddings, shifted loss); "
                     "perplexity; greedy/top-k/top-p generation with the key/value cache",
        modalities=("text",),
    )


def shift_labels(labels: Tensor) -> Tensor:
    """HF's shift: append -100 and drop the first label, so position ``t`` is scored on ``t + 1``."""
    return nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


class CausalLMHead(LanguageModelHead):
    """Parameters (keyword-only): ``input_dim`` and ``vocab_size`` (injected), ``layer_norm_eps``,
    ``activation``, ``tie_word_embeddings``."""

    tasks = ("text-generation", "next-token")

    def __init__(
        self,
        *,
        input_dim: int,
        vocab_size: int | None = None,
        layer_norm_eps: float = 1e-5,
        activation: str = "gelu",
        tie_word_embeddings: bool = True,
    ) -> None:
        super().__init__(input_dim=input_dim, vocab_size=vocab_size, layer_norm_eps=layer_norm_eps,
                         activation=activation, tie_word_embeddings=tie_word_embeddings, name="causal_lm")

    def hf_config(self) -> dict[str, Any]:
        return {**self.lm_config(), "is_decoder": True}

    @staticmethod
    def labels_from_batch(batch: dict[str, Any]) -> Tensor | None:
        """``batch["labels"]``; else the inputs with padding ignored; ``None`` while generating
        (the batch carries a cache: its inputs are only the newest tokens)."""
        labels = batch.get("labels")
        if labels is not None:
            return labels
        if batch.get("past_key_values") is not None or batch.get("use_cache"):
            return None
        inputs = batch.get("inputs")
        if inputs is None:
            return None
        padding = batch.get("padding_mask")
        return inputs if padding is None else inputs.masked_fill(padding.to(inputs.device), IGNORE_INDEX)

    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any] | None = None) -> HeadOutput:
        logits = self.token_logits(encoder_output.last_hidden_state)
        labels = self.labels_from_batch(batch or {})
        if labels is None:
            return HeadOutput(logits=logits)
        shifted = shift_labels(labels.to(logits.device))
        nll, tokens = token_nll(logits, shifted)
        return HeadOutput(logits=logits, loss=nll / tokens.clamp(min=1),
                          extras={"nll_sum": nll.detach(), "tokens": tokens, "shifted_labels": shifted})

    # ------------------------------------------------------------------ predictions
    def predict(self, output: HeadOutput, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Per example: the most probable next token after its last real token and its probability."""
        last = last_token_index(batch.get("padding_mask"), output.logits.shape[:2], output.logits.device)
        rows = torch.arange(output.logits.shape[0], device=output.logits.device)
        probs = output.logits.detach()[rows, last].float().softmax(-1)
        score, token = probs.max(-1)
        return [{"next_token_id": int(t), "score": float(s)} for t, s in zip(token.tolist(), score.tolist())]

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """Per example: the ``top_k`` next tokens after its last real token ``{"score",
        "token_id", "token"}`` (``token`` needs ``decode``)."""
        last = last_token_index(batch.get("padding_mask"), output.logits.shape[:2], output.logits.device)
        rows = torch.arange(output.logits.shape[0], device=output.logits.device)
        probs = output.logits.detach()[rows, last].float().softmax(-1)
        out = []
        for row in probs:
            scores, ids = row.topk(min(int(top_k), self.vocab_size))
            tokens = [{"score": s, "token_id": t, **({"token": decode([t])} if decode else {})}
                      for s, t in zip(scores.tolist(), ids.tolist())]
            out.append({"next_tokens": tokens})
        return out

    def predict_step(self, model: nn.Module, batch: dict[str, Any], *, task: str, top_k: int = 5,
                     decode: Any = None, max_new_tokens: int = 20, strategy: str = "greedy",
                     temperature: float = 1.0, sample_top_k: int = 50, top_p: float | None = None,
                     seed: int | None = None) -> list[dict]:
        """``text-generation``: continue each prompt with :func:`generate` (greedy, or sampling
        from the ``sample_top_k`` / ``top_p`` pool with ``seed``; ``sample_top_k`` 50 as Hugging
        Face's default, 0 = no limit) until ``</s>`` or ``max_new_tokens``:
        ``{"generated_text": prompt + continuation, "new_tokens": [...ids]}``. ``next-token``:
        one forward pass and :meth:`describe` with ``top_k`` candidates."""
        if task != "text-generation":
            return self.describe(model(batch).head_output, batch, top_k=top_k, decode=decode)
        if int(sample_top_k) < 0:
            raise SpecError(f"sample_top_k must be >= 0 (0: no limit), got {sample_top_k}.")
        inputs, padding = batch["inputs"], batch.get("padding_mask")
        attention = None if padding is None else ~padding.bool()
        generator = None if seed is None else torch.Generator(device=inputs.device).manual_seed(int(seed))
        sequences = generate(model, inputs, attention, max_new_tokens=int(max_new_tokens), strategy=strategy,
                             top_k=int(sample_top_k), top_p=top_p, temperature=temperature,
                             eos_token_id=batch.get("eos_token_id"), generator=generator)
        out = []
        for b in range(inputs.shape[0]):
            prompt = inputs[b] if padding is None else inputs[b][~padding[b].bool()]
            new = sequences[b, inputs.shape[1]:].tolist()
            eos = batch.get("eos_token_id")
            if eos is not None and eos in new:
                new = new[: new.index(eos) + 1]
            result: dict[str, Any] = {"new_tokens": new}
            if decode is not None:
                result = {"generated_text": decode(prompt.tolist() + new), **result}
            out.append(result)
        return out

    # ------------------------------------------------------------------ metrics
    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, float]:
        extras = output.extras or {}
        shifted = extras.get("shifted_labels")
        if shifted is None:
            labels = self.labels_from_batch(batch)
            if labels is None:
                return {}
            shifted = shift_labels(labels.to(output.logits.device))
        nll, tokens = extras.get("nll_sum"), extras.get("tokens")
        if nll is None:
            nll, tokens = token_nll(output.logits, shifted)
        correct = ((output.logits.argmax(-1) == shifted) & (shifted != IGNORE_INDEX)).sum()
        return {"lm_nll_sum": float(nll), "lm_tokens": float(tokens), "lm_correct": float(correct)}

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        tokens = counts.get("lm_tokens", 0.0)
        if not tokens:
            return {}
        return {"perplexity": perplexity(counts["lm_nll_sum"], tokens),
                "next_token_accuracy": 100.0 * counts["lm_correct"] / tokens}


def last_token_index(padding_mask: Tensor | None, shape: tuple[int, int], device: Any) -> Tensor:
    """Index of each row's last real token (works for left and right padding)."""
    batch, length = shape
    if padding_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device).expand(batch, length)
    real = ~padding_mask.to(device).bool()[:, -length:]
    return torch.where(real, positions, torch.full_like(positions, -1)).amax(-1).clamp(min=0)


# --------------------------------------------------------------------------- generation


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to ``-inf`` every logit outside the ``top_k`` best and outside the smallest set whose
    probability reaches ``top_p`` (nucleus), as HF's top-k and top-p warpers (at least one token
    is always kept)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(int(top_k), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def position_ids_for(padding_mask: Tensor, padding_idx: int) -> Tensor:
    """RoBERTa position ids for the whole sequence: ``padding_idx + 1 + `` the number of real tokens
    before each real token, ``padding_idx`` at padding (HF's ``create_position_ids_from_input_ids``,
    counted on the mask so padding anywhere, left, right or between prompt and new tokens, is skipped)."""
    real = (~padding_mask).long()
    return (real.cumsum(-1) * real + padding_idx).long()


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    strategy: str = "greedy",
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Continue each prompt of ``input_ids`` ``(B, S)`` by up to ``max_new_tokens`` tokens with a d2v
    ``TaskModel`` whose head is :class:`CausalLMHead` (its encoder a decoder with a cache).

    ``attention_mask`` ``(B, S)`` (1 = real token, HF's convention) may pad prompts on the **left
    or the right**: the batch given to the model carries ``padding_mask`` over all tokens so far
    (past + new, as HF's ``attention_mask`` while decoding) and explicit ``position_ids`` that
    count only real tokens, so every row decodes exactly as it would alone without padding; the
    first new token is predicted from each row's last real prompt token. New tokens are appended
    after the whole padded prompt. Rows that produced ``eos_token_id`` continue with
    ``pad_token_id`` (default: the feature extractor's ``padding_idx``); decoding stops once every
    row is done. ``use_cache=False`` recomputes the full sequence each step (the reference the
    cached path is tested against). Returns ``(B, S + new)`` token ids.

    ``strategy``: ``"greedy"`` (argmax) or ``"sample"`` (``temperature``, then ``top_k`` /
    ``top_p`` filtering, then a draw with ``generator``).
    """
    if strategy not in ("greedy", "sample"):
        raise SpecError(f"generate: strategy must be 'greedy' or 'sample', not {strategy!r}.")
    if strategy == "sample" and not temperature > 0:
        raise SpecError(f"generate: temperature must be > 0 for sampling, got {temperature}.")
    if not isinstance(getattr(model, "head", None), CausalLMHead):
        raise SpecError("generate: the model's head must be causal_lm (model.head.name: causal_lm).")
    padding_idx = int(getattr(model.feature_extractor, "padding_idx", 1))
    pad_token_id = padding_idx if pad_token_id is None else int(pad_token_id)
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    padding = ~attention_mask.to(device).bool()
    sequences = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    cache = None
    step_inputs = input_ids
    for step in range(int(max_new_tokens)):
        positions = position_ids_for(padding, padding_idx)
        batch: dict[str, Any] = {"inputs": step_inputs, "padding_mask": padding,
                                 "position_ids": positions[:, -step_inputs.shape[1]:]}
        if use_cache:
            batch["use_cache"] = True
            if cache is not None:
                batch["past_key_values"] = cache
        out = model(batch)
        if use_cache:
            if out.past_key_values is None:
                raise SpecError("generate: the encoder returned no cache; build it with "
                                "model.encoder.is_decoder: true.")
            cache = out.past_key_values
        if step == 0 or not use_cache:
            last = last_token_index(padding, out.logits.shape[:2], device)
            logits = out.logits[torch.arange(out.logits.shape[0], device=device), last]
        else:
            logits = out.logits[:, -1]
        logits = logits.float()
        if strategy == "greedy":
            token = logits.argmax(-1)
        else:
            probs = filter_logits(logits / temperature, top_k=top_k, top_p=top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        padding = torch.cat([padding, torch.zeros_like(done)[:, None]], dim=1)
        if eos_token_id is not None:
            done = done | (token == int(eos_token_id))
            if bool(done.all()):
                break
        step_inputs = token[:, None] if use_cache else sequences
    return sequences


__all__ = ["CausalLMHead", "filter_logits", "generate", "last_token_index", "position_ids_for", "shift_labels"]
