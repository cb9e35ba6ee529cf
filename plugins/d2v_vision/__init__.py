"""d2v's image modality: data2vec-vision (as Hugging Face's ``Data2VecVisionModel``), its image
processor, datasets and presets. Registered through the ``d2v`` entry point ``vision``."""

from d2v import hookimpl


@hookimpl
def d2v_register(register):
    register("feature_extractor", "vision.patches", "d2v_vision.patches:PatchEmbedding",
             summary="non-overlapping patches, linearly embedded (Conv2d), with a CLS token in front")
    register("encoder", "vision.transformer", "d2v_vision.encoder:VisionTransformerEncoder",
             summary="BEiT pre-LN ViT: relative position bias (per layer or shared) or absolute positions, "
                     "layer scale, stochastic depth, mean/CLS pooling, any image size")
    register("processor", "image", "d2v_vision.processor:ImageProcessor",
             summary="BeitImageProcessor preprocessing (resize, crop, rescale, normalise) + training augmentation")
    register("dataset", "image_folder", "d2v_vision.datasets:ImageFolder",
             summary="ImageNet layout: <root>/<split>/<class>/*.JPEG")
    register("dataset", "ade20k", "d2v_vision.datasets:ADE20k",
             summary="ADEChallengeData2016: images/<split>/*.jpg + annotations/<split>/*.png")
    register("model", "data2vec-vision-base", "d2v_vision.presets:data2vec_vision_base",
             summary="data2vec-vision Base: ViT-B/16, 12 layers, 768 wide (facebook/data2vec-vision-base)")
    register("model", "data2vec-vision-large", "d2v_vision.presets:data2vec_vision_large",
             summary="data2vec-vision Large: ViT-L/16, 24 layers, 1024 wide (facebook/data2vec-vision-large)")
    register("model", "data2vec-vision-tiny", "d2v_vision.presets:data2vec_vision_tiny",
             summary="a tiny data2vec-vision (32 px, 4 px patches, 4 layers) for tests and CPU demos")
    register("hf_converter", "Data2VecVisionModel", "d2v_vision.hf:VisionModelConverter",
             summary="import/export Hugging Face Data2VecVisionModel checkpoints")
    register("hf_converter", "Data2VecVisionForImageClassification", "d2v_vision.hf:VisionImageClassificationConverter",
             summary="import/export Hugging Face Data2VecVisionForImageClassification checkpoints")
    register("hf_converter", "Data2VecVisionForSemanticSegmentation", "d2v_vision.hf:VisionSemanticSegmentationConverter",
             summary="import/export Hugging Face Data2VecVisionForSemanticSegmentation checkpoints")
