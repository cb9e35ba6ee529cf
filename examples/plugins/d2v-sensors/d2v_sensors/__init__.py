"""d2v-sensors: multichannel sensor time series as a d2v modality, from outside d2v.

Registered through the ``d2v`` entry point ``sensors``; nothing here is imported until a
component is built. The encoder and the classification head are d2v's own (``audio.transformer``,
``audio_classification``): a new modality needs only its feature extractor, processor and data.
"""

from d2v import hookimpl


@hookimpl
def d2v_register(register):
    register("feature_extractor", "sensors.patches", "d2v_sensors.feature_extractor:SensorPatchEmbedding",
             summary="multichannel time series (B, S, C) -> strided-conv patch embeddings + LayerNorm and projection",
             modalities=("sensors",))
    register("processor", "sensors", "d2v_sensors.processor:SensorProcessor",
             summary="sensor recordings: channel check, crop, per-recording normalisation, zero-padded (B, S, C) batches",
             modalities=("sensors",))
    register("dataset", "sensor_synthetic", "d2v_sensors.datasets:SyntheticActivities",
             summary="deterministic synthetic 3-axis accelerometer recordings of six activities (seeded, nothing on disk)",
             modalities=("sensors",))
    register("dataset", "sensor_folder", "d2v_sensors.datasets:SensorFolder",
             summary="one class per recording: <root>/[<split>/]<label>/*.npy|*.csv (rows = time, columns = channels)",
             modalities=("sensors",), paths=("root",))
    register("model", "data2vec-sensors-tiny", "d2v_sensors.presets:data2vec_sensors_tiny",
             summary="a tiny sensor model: 0.2 s patches, 4-layer 64-wide audio.transformer with ALiBi")


@hookimpl
def d2v_cli_commands(subparsers):
    from d2v_sensors.cli import add_commands

    add_commands(subparsers)
