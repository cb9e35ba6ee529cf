"""Other formats: Hugging Face checkpoints (``hf``), fairseq checkpoints read without fairseq
(``fairseq``, ``fairseq_names``, ``fairseq_multi``, ``safe_pickle``), ``d2v convert`` (``convert``), initial weights
from any of these (``weights``), finding a model behind a path (``locate``) and exports to ONNX
and TensorFlow (``onnx_export``, ``opsets``, ``tf_export``). Modality specifics live in the plugins'
converters.

Imports ``d2v.api``, ``d2v.spec`` and ``d2v.train.checkpoint`` (a run's newest checkpoint).
"""
