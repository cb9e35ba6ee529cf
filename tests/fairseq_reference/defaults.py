"""fairseq's ``data2vec_multi`` config defaults (the dataclass field defaults of
``Data2VecMultiConfig``, ``D2vModalityConfig`` and ``D2vDecoderConfig`` in
``examples/data2vec/models/data2vec2.py`` and ``modalities/{base,modules}.py``), as a stored
checkpoint spells them (``${..}`` interpolations unresolved). The fixtures state only what their
released recipe changes."""

from __future__ import annotations

from typing import Any


def multi_model(values: dict[str, Any]) -> dict[str, Any]:
    return {
        "_name": "data2vec_multi", "loss_beta": 0.0, "loss_scale": None, "depth": 8, "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0, "num_heads": 12, "norm_eps": 1e-6, "norm_affine": True, "encoder_dropout": 0.1,
        "post_mlp_drop": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "dropout_input": 0.0,
        "layerdrop": 0.0, "embed_dim": 768, "mlp_ratio": 4.0, "layer_norm_first": False, "average_top_k_layers": 8,
        "end_of_block_targets": False, "clone_batch": 1, "layer_norm_target_layer": False,
        "batch_norm_target_layer": False, "instance_norm_target_layer": False, "instance_norm_targets": False,
        "layer_norm_targets": False, "ema_decay": 0.999, "ema_same_dtype": True, "log_norms": True,
        "ema_end_decay": 0.9999, "ema_anneal_end_step": "${optimization.max_update}", "ema_encoder_only": True,
        "max_update": "${optimization.max_update}", "shared_decoder": None, "min_target_var": 0.1,
        "min_pred_var": 0.01, "supported_modality": None, "mae_init": False, "seed": "${common.seed}",
        "skip_ema": False, "cls_loss": 0.0, "recon_loss": 0.0, "d2v_loss": 1.0, "decoder_group": False,
        **values,
    }


def modality(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": kind, "prenet_depth": 4, "prenet_layerdrop": 0.0, "prenet_dropout": 0.0, "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0, "num_extra_tokens": 0, "init_extra_token_zero": True, "mask_noise_std": 0.01,
        "mask_prob_min": None, "mask_prob": 0.7, "inverse_mask": False, "mask_prob_adjust": 0.0,
        "keep_masked_pct": 0.0, "mask_length": 5, "add_masks": False, "remove_masks": False, "mask_dropout": 0.0,
        "encoder_zero_mask": True, "mask_channel_prob": 0.0, "mask_channel_length": 64, "ema_local_encoder": False,
        "local_grad_mult": 1.0, "use_alibi_encoder": False, "alibi_scale": 1.0, "learned_alibi": False,
        "alibi_max_pos": None, "learned_alibi_scale": False, "learned_alibi_scale_per_head": False,
        "learned_alibi_scale_per_layer": False, "num_alibi_heads": "${model.num_heads}",
        "model_depth": "${model.depth}", **values,
    }


def decoder(values: dict[str, Any]) -> dict[str, Any]:
    return {
        "decoder_dim": 384, "decoder_groups": 16, "decoder_kernel": 5, "decoder_layers": 5, "input_dropout": 0.1,
        "add_positions_masked": False, "add_positions_all": False, "decoder_residual": True, "projection_layers": 1,
        "projection_ratio": 2.0, **values,
    }
