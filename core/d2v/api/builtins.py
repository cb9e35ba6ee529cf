"""Core's own components, registered through the same hook every plugin uses (plugin 'd2v')."""

from d2v.api.hookspecs import hookimpl


@hookimpl
def d2v_register(register):
    # masking generators (d2v.ssl.masking): pure, seeded, usable in data-loader workers
    register("masking", "span", "d2v.ssl.masking:SpanMask", summary="wav2vec 2.0 / data2vec 1.0 span masking (mask_prob, mask_length, min_masks)")
    register("masking", "block2d", "d2v.ssl.masking:BlockMask2d", summary="BEiT block-wise image masking (num_masking_patches, min/max patches per block, aspect ratio)")
    register("masking", "bert", "d2v.ssl.masking:BertMask", summary="BERT token masking: 15% of tokens, 80% <mask> / 10% random / 10% unchanged")
    register("masking", "inverse_block", "d2v.ssl.masking:InverseBlockMask", summary="data2vec 2.0 block masking, 1d or 2d, inverse option, exact masked count")
    register("masking", "random", "d2v.ssl.masking:RandomMask", summary="MAE random masking with an exact masked count per example")
    # optimisation
    register("optimizer", "adamw", "d2v.train.optim:adamw", summary="AdamW with weight decay off for biases and norms; optional layer-wise lr decay")
    register("optimizer", "adam", "d2v.train.optim:adam", summary="Adam (fairseq's, i.e. decoupled weight decay) with data2vec's defaults")
    register("schedule", "tri_stage", "d2v.train.schedules:tri_stage", summary="wav2vec 2.0 tri-stage: linear warmup, hold, exponential decay")
    register("schedule", "cosine", "d2v.train.schedules:cosine", summary="linear warmup then cosine decay to a floor")
    register("schedule", "polynomial", "d2v.train.schedules:polynomial", summary="linear warmup then polynomial decay (power 1: fairseq's polynomial_decay of the GLUE recipes)")
    register("schedule", "constant", "d2v.train.schedules:constant", summary="optional linear warmup then constant")
    # data
    register("dataset", "shards", "d2v.data.shards:ShardedDataset", summary="any modality's examples from tar shards made by `d2v shards make` (WebDataset layout, random access)")
