"""d2v's speech modality: data2vec-audio (as Hugging Face's ``Data2VecAudioModel``), its
processor, datasets and presets. Registered through the ``d2v`` entry point ``audio``."""

from d2v import hookimpl


@hookimpl
def d2v_register(register):
    register("feature_extractor", "audio.conv", "d2v_audio.feature_extractor:ConvFeatureExtractor",
             summary="wav2vec 2.0 conv feature encoder with per-layer LayerNorm, + LayerNorm and projection",
             modalities=("audio",))
    register("encoder", "audio.transformer", "d2v_audio.encoder:AudioTransformerEncoder",
             summary="post-LN Transformer with 5-layer positional conv, mask embedding, layerdrop, SpecAugment")
    register("processor", "audio", "d2v_audio.processor:AudioProcessor",
             summary="soundfile loading, resampling, zero-mean/unit-variance normalisation, padded batches",
             modalities=("audio",))
    register("dataset", "librispeech", "d2v_audio.datasets:LibriSpeech",
             summary="LibriSpeech on-disk layout: <root>/<split>/<spk>/<chapter>/*.flac + *.trans.txt",
             modalities=("audio",), paths=("root",))
    register("dataset", "audio_manifest", "d2v_audio.datasets:AudioManifest",
             summary="TSV manifest of path, n_samples, transcript for any speech corpus",
             modalities=("audio",), paths=("path", "root"))
    register("dataset", "audio_folder", "d2v_audio.labelled_datasets:AudioFolder",
             summary="one class per utterance: <root>/<split>/<label>/*.wav|flac (keyword spotting, emotion)",
             modalities=("audio",), paths=("root", "include_list", "exclude_lists"))
    register("dataset", "audio_segments", "d2v_audio.labelled_datasets:AudioSegments",
             summary="frame labels from segments: TSV path/start/end/label or RTTM (diarization)",
             modalities=("audio",), paths=("manifest", "root", "audio_dir"))
    register("dataset", "voxceleb", "d2v_audio.labelled_datasets:VoxCeleb",
             summary="speaker verification: <root>/<speaker>/<video>/*.wav, train/test split by a trial list",
             modalities=("audio",), paths=("root", "trials"))
    register("model", "data2vec-audio-base", "d2v_audio.presets:data2vec_audio_base",
             summary="data2vec-audio Base: 12 layers, 768 wide (facebook/data2vec-audio-base)")
    register("model", "data2vec-audio-large", "d2v_audio.presets:data2vec_audio_large",
             summary="data2vec-audio Large: 24 layers, 1024 wide (facebook/data2vec-audio-large)")
    register("model", "data2vec-audio-tiny", "d2v_audio.presets:data2vec_audio_tiny",
             summary="a tiny data2vec-audio for tests and CPU demos")
    register("hf_converter", "Data2VecAudioModel", "d2v_audio.hf:AudioModelConverter",
             summary="import/export Hugging Face Data2VecAudioModel checkpoints")
    register("hf_converter", "Data2VecAudioForCTC", "d2v_audio.hf:AudioCTCConverter",
             summary="import/export Hugging Face Data2VecAudioForCTC checkpoints")
    register("hf_converter", "Data2VecAudioForSequenceClassification", "d2v_audio.hf:AudioSequenceClassificationConverter",
             summary="import/export Hugging Face Data2VecAudioForSequenceClassification checkpoints")
    register("hf_converter", "Data2VecAudioForAudioFrameClassification", "d2v_audio.hf:AudioFrameClassificationConverter",
             summary="import/export Hugging Face Data2VecAudioForAudioFrameClassification checkpoints")
    register("hf_converter", "Data2VecAudioForXVector", "d2v_audio.hf:AudioXVectorConverter",
             summary="import/export Hugging Face Data2VecAudioForXVector checkpoints")
    register("fairseq_converter", "data2vec_audio", "d2v_audio.fairseq:Data2VecAudioImporter",
             summary="fairseq data2vec 1.0 speech pretraining (.pt) -> backbone + data2vec objective and EMA teacher")
    register("fairseq_converter", "data2vec_multi_audio", "d2v_audio.fairseq:Data2VecMultiAudioImporter",
             summary="fairseq data2vec 2.0 speech pretraining (.pt) -> backbone + data2vec2 decoder and EMA teacher")
    register("fairseq_converter", "wav2vec_ctc", "d2v_audio.fairseq:Wav2VecCtcImporter",
             summary="fairseq CTC fine-tuned data2vec 1.0/2.0 speech models (.pt) -> backbone + ctc head")
