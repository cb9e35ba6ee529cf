"""d2v's image modality: data2vec-vision (as Hugging Face's ``Data2VecVisionModel``), data2vec
2.0's ViT (fairseq ``data2vec_multi`` images, with its checkpoint importers), the image
processor, datasets and presets. Registered through the ``d2v`` entry point ``vision``."""

from d2v import hookimpl


@hookimpl
def d2v_register(register):
    register("feature_extractor", "vision.patches", "d2v_vision.patches:PatchEmbedding",
             summary="non-overlapping patches, linearly embedded (Conv2d), with a CLS token in front",
             modalities=("image",))
    register("encoder", "vision.transformer", "d2v_vision.encoder:VisionTransformerEncoder",
             summary="BEiT pre-LN ViT: relative position bias (per layer or shared) or absolute positions, "
                     "layer scale, stochastic depth, mean/CLS pooling, any image size",
             modalities=("image",))
    register("feature_extractor", "vision.vit", "d2v_vision.vit_patches:ViTPatchEmbedding",
             summary="data2vec 2.0 images: Conv2d patches + fixed 2-D sin-cos positions, extra (CLS) tokens in front",
             modalities=("image",))
    register("encoder", "vision.vit_transformer", "d2v_vision.vit_encoder:ViTEncoder",
             summary="data2vec 2.0 images (fairseq data2vec_multi): LayerNorm, prenet + shared post-LN blocks "
                     "(fused qkv), mean pooling + fc_norm",
             modalities=("image",))
    register("processor", "image", "d2v_vision.processor:ImageProcessor",
             summary="BeitImageProcessor preprocessing (resize, crop, rescale, normalise) + training augmentation",
             modalities=("image",))
    register("dataset", "image_folder", "d2v_vision.datasets:ImageFolder",
             summary="ImageNet layout: <root>/<split>/<class>/*.JPEG",
             modalities=("image",), paths=("root",))
    register("dataset", "ade20k", "d2v_vision.datasets:ADE20k",
             summary="ADEChallengeData2016: images/<split>/*.jpg + annotations/<split>/*.png",
             modalities=("image",), paths=("root",))
    register("model", "data2vec-vision-base", "d2v_vision.presets:data2vec_vision_base",
             summary="data2vec-vision Base: ViT-B/16, 12 layers, 768 wide (facebook/data2vec-vision-base)")
    register("model", "data2vec-vision-large", "d2v_vision.presets:data2vec_vision_large",
             summary="data2vec-vision Large: ViT-L/16, 24 layers, 1024 wide (facebook/data2vec-vision-large)")
    register("model", "data2vec-vision-tiny", "d2v_vision.presets:data2vec_vision_tiny",
             summary="a tiny data2vec-vision (32 px, 4 px patches, 4 layers) for tests and CPU demos")
    register("model", "data2vec2-vision-base", "d2v_vision.presets:data2vec2_vision_base",
             summary="data2vec 2.0 ViT-B/16: 768 wide, 2 prenet + 10 blocks, sin-cos positions (fairseq base_imagenet.pt)")
    register("model", "data2vec2-vision-large", "d2v_vision.presets:data2vec2_vision_large",
             summary="data2vec 2.0 ViT-L/16: 1024 wide, 24 blocks (fairseq large_imagenet.pt)")
    register("model", "data2vec2-vision-huge", "d2v_vision.presets:data2vec2_vision_huge",
             summary="data2vec 2.0 ViT-H/16: 1280 wide, 32 blocks (fairseq huge_imagenet.pt)")
    register("model", "data2vec2-vision-tiny", "d2v_vision.presets:data2vec2_vision_tiny",
             summary="a tiny data2vec 2.0 ViT (32 px, 4 px patches, 1 prenet + 3 blocks) for tests and CPU demos")
    register("fairseq_converter", "data2vec_multi_image", "d2v_vision.fairseq:Data2VecMultiImageImporter",
             summary="fairseq data2vec 2.0 image checkpoints (data2vec_multi, IMAGE) -> pretraining model with teacher")
    register("fairseq_converter", "mae_image_classification", "d2v_vision.fairseq:MaeImageClassificationImporter",
             summary="fairseq data2vec 2.0 fine-tuned image classifiers (mae_image_classification) -> image_classification")
    register("hf_converter", "Data2VecVisionModel", "d2v_vision.hf:VisionModelConverter",
             summary="import/export Hugging Face Data2VecVisionModel checkpoints")
    register("hf_converter", "Data2VecVisionForImageClassification", "d2v_vision.hf:VisionImageClassificationConverter",
             summary="import/export Hugging Face Data2VecVisionForImageClassification checkpoints")
    register("hf_converter", "Data2VecVisionForSemanticSegmentation", "d2v_vision.hf:VisionSemanticSegmentationConverter",
             summary="import/export Hugging Face Data2VecVisionForSemanticSegmentation checkpoints")
