"""`d2v predict` and `d2v.pipeline`: every task on files the test writes, against the model's own
logits computed by hand (tiny random models saved as d2v checkpoints or Hugging Face directories).

Inputs: wav at 16 kHz, wav at 44.1 kHz stereo, a corrupt wav, PNGs of odd sizes, a corrupt PNG,
a .txt file of lines and --text strings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from d2v.api import plugins
from d2v.spec.model import build_task_model
from d2v.use.pipeline import pipeline
from d2v.use.predict import add_parser

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "experiments" / "data" / "text_demo" / "tokenizer"
AUDIO = {"name": "audio", "sample_rate": 16000, "normalize": True}
TEXT = {"name": "text", "tokenizer": str(TOKENIZER), "max_length": 64}
IMAGE = {"name": "image", "size": 32, "crop_size": 32}
KEYWORDS = ["down", "left", "no", "right", "up", "yes"]


# --------------------------------------------------------------------------- helpers


def save_checkpoint(directory: Path, model_spec: dict, processor: dict, *, seed: int = 0):
    """A d2v checkpoint as a run's final/ holds it (weights + spec.yaml), random weights."""
    torch.manual_seed(seed)
    model = build_task_model(model_spec, plugins.registry()).eval()
    directory.mkdir(parents=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    spec = {"task": "finetune", "model": model_spec, "data": {"processor": processor}}
    (directory / "spec.yaml").write_text(yaml.safe_dump(spec))
    return model


def cli(args: list[str], capsys) -> tuple[int, list[dict], str]:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    parsed = parser.parse_args(["predict", *args])
    code = parsed.fn(parsed)
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def normalized(waveform: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(waveform, dtype=torch.float64)
    return ((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)).float()


def by_hand_16k(path: Path) -> torch.Tensor:
    """The model input for a 16 kHz mono file, computed without d2v's processor."""
    data, rate = sf.read(str(path), dtype="float32")
    assert rate == 16000
    return normalized(data)[None]


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    t = np.arange(16000) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.cos(2 * np.pi * 37 * t)
    sf.write(str(root / "tone16k.wav"), tone.astype(np.float32), 16000)
    t44 = np.arange(44100 * 3 // 4) / 44100  # 0.75 s
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 330 * t44), 0.2 * np.sin(2 * np.pi * 523 * t44 + 1.0)], axis=1)
    sf.write(str(root / "stereo44k.wav"), stereo.astype(np.float32), 44100)
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(range(200)))
    return root


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 256, (36, 30), dtype=np.uint8)).save(root / "grey.png")  # L mode
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return root


# --------------------------------------------------------------------------- audio


def test_audio_classification_resamples_mixes_down_and_skips_a_corrupt_file(tmp_path, audio_files, capsys):
    spec = {"preset": "data2vec-audio-tiny",
            "head": {"name": "audio_classification", "label_names": KEYWORDS, "classifier_proj_size": 16}}
    model = save_checkpoint(tmp_path / "run" / "final", spec, AUDIO)
    code, records, err = cli([str(tmp_path / "run"), str(audio_files), "--top-k", "3", "--device", "cpu"], capsys)
    assert code == 1  # corrupt.wav failed
    by_input = {Path(r["input"]).name: r for r in records}
    assert list(by_input) == ["corrupt.wav", "stereo44k.wav", "tone16k.wav"]  # directory order, nothing dropped
    assert "corrupt.wav" in by_input["corrupt.wav"]["error"] and "corrupt.wav" in err

    with torch.no_grad():
        expected = model({"inputs": by_hand_16k(audio_files / "tone16k.wav")}).logits.softmax(-1)[0]
    tone = by_input["tone16k.wav"]
    assert [c["label"] for c in tone["top_k"]] == [KEYWORDS[i] for i in expected.topk(3).indices]
    np.testing.assert_allclose([c["score"] for c in tone["top_k"]], expected.topk(3).values, atol=1e-5)
    assert tone["label"] == tone["top_k"][0]["label"] and tone["score"] == tone["top_k"][0]["score"]

    # 44.1 kHz stereo: as if mixed down (channel mean) and resampled to 16 kHz by hand
    import torchaudio.functional as AF

    data, rate = sf.read(str(audio_files / "stereo44k.wav"), dtype="float32")
    by_hand = AF.resample(torch.from_numpy(data.mean(axis=1)), orig_freq=rate, new_freq=16000).numpy()
    pipe = pipeline(model=str(tmp_path / "run"), top_k=3, device="cpu")
    from_file = pipe(str(audio_files / "stereo44k.wav"))  # alone, as the array: no padding
    from_array = pipe({"array": by_hand, "sampling_rate": 16000})
    assert [c["label"] for c in from_array["top_k"]] == [c["label"] for c in from_file["top_k"]]
    np.testing.assert_allclose([c["score"] for c in from_file["top_k"]],
                               [c["score"] for c in from_array["top_k"]], atol=1e-6)


def test_ctc_transcribes_the_same_from_a_d2v_and_a_hugging_face_checkpoint(tmp_path, audio_files):
    from d2v.interop.convert import convert
    from d2v.interop.hf import save_pretrained

    spec = {"preset": "data2vec-audio-tiny", "head": {"name": "ctc", "vocab": "librispeech"}}
    model = save_checkpoint(tmp_path / "final", spec, AUDIO, seed=3)
    save_pretrained(model, tmp_path / "hf", "Data2VecAudioForCTC")
    with torch.no_grad():
        out = model({"inputs": by_hand_16k(audio_files / "tone16k.wav")})
    expected = model.head.predict(out.head_output, {})[0]
    files = [str(audio_files / "tone16k.wav"), str(audio_files / "stereo44k.wav")]
    ours = pipeline(model=str(tmp_path / "final"), device="cpu")(files)
    theirs = pipeline(model=str(tmp_path / "hf"), device="cpu")(files)
    assert ours[0] == {"input": files[0], "text": expected}
    assert ours == theirs
    # converted back to d2v, its spec names no processor: the exporting converter's is used
    convert(tmp_path / "hf", tmp_path / "converted", to="d2v")
    assert pipeline(model=str(tmp_path / "converted"), device="cpu")(files) == ours
    assert pipeline(model=str(tmp_path / "final")).task == "automatic-speech-recognition"


def test_decoder_option_switches_ctc_decoding_for_one_prediction_run(tmp_path, audio_files, capsys):
    """``--decoder beam`` decodes with the head's prefix beam search (the saved spec is untouched);
    a bad decoder mapping is one clear error naming the option."""
    from d2v.api.errors import SpecError
    from d2v_heads.speech.ctc import ctc_beam_ids

    spec = {"preset": "data2vec-audio-tiny", "head": {"name": "ctc", "vocab": "librispeech"}}
    model = save_checkpoint(tmp_path / "final", spec, AUDIO, seed=3)
    with torch.no_grad():
        logits = model({"inputs": by_hand_16k(audio_files / "tone16k.wav")}).logits
    ids = ctc_beam_ids(logits.log_softmax(-1), None, beam_size=8, blank=model.head.blank_id)[0]
    code, records, _ = cli([str(tmp_path / "final"), str(audio_files / "tone16k.wav"), "--decoder", "beam",
                            "--device", "cpu"], capsys)
    assert code == 0 and records[0]["text"] == model.head.vocab.decode(ids)
    with pytest.raises(SpecError, match="lm"):
        cli([str(tmp_path / "final"), str(audio_files / "tone16k.wav"), "--device", "cpu",
             "--decoder", "{name: lm_beam, lm: missing.arpa}"], capsys)


def test_frame_classification_segments_cover_the_active_real_frames(tmp_path, audio_files):
    spec = {"preset": "data2vec-audio-tiny", "head": {"name": "audio_frame_classification", "label_names": ["A", "B"]}}
    model = save_checkpoint(tmp_path / "final", spec, AUDIO, seed=1)
    files = [str(audio_files / "stereo44k.wav"), str(audio_files / "tone16k.wav")]  # padded in one batch
    results = pipeline(model=str(tmp_path / "final"), device="cpu")(files)
    with torch.no_grad():
        logits = model({"inputs": by_hand_16k(audio_files / "tone16k.wav")}).logits[0]
    active = torch.sigmoid(logits) > 0.5
    covered = torch.zeros_like(active)
    for segment in results[1]["segments"]:
        k = ["A", "B"].index(segment["label"])
        first, last = round(segment["start"] / 0.02), round(segment["end"] / 0.02)
        covered[first:last, k] = True
        np.testing.assert_allclose(segment["score"], torch.sigmoid(logits[first:last, k]).mean(), atol=1e-5)
    assert torch.equal(covered, active)
    frames_44k = len(sf.read(str(audio_files / "stereo44k.wav"))[0]) * 16000 // 44100 // 320
    assert all(s["end"] <= frames_44k * 0.02 + 0.02 for s in results[0]["segments"])  # no segment in the padding


def test_speaker_embeddings_and_verify(tmp_path, audio_files, capsys):
    spec = {"preset": "data2vec-audio-tiny",
            "head": {"name": "xvector", "num_labels": 4, "tdnn_dim": [16, 16, 16, 16, 32], "xvector_output_dim": 16}}
    model = save_checkpoint(tmp_path / "final", spec, AUDIO, seed=2)
    tone, stereo, corrupt = (str(audio_files / n) for n in ("tone16k.wav", "stereo44k.wav", "corrupt.wav"))
    code, records, err = cli([str(tmp_path / "final"), "--verify", tone, stereo, "--verify", tone, tone,
                              "--verify", tone, corrupt], capsys)
    assert code == 1  # the pair with corrupt.wav failed
    embeddings = pipeline(model=str(tmp_path / "final"), device="cpu")([tone, stereo])
    with torch.no_grad():
        by_hand = model({"inputs": by_hand_16k(audio_files / "tone16k.wav")}).head_output.extras["embeddings"][0]
    np.testing.assert_allclose(embeddings[0]["embedding"], by_hand, atol=1e-5)
    a, b = (torch.tensor(e["embedding"]) for e in embeddings)
    assert records[0]["inputs"] == [tone, stereo]
    np.testing.assert_allclose(records[0]["score"], torch.nn.functional.cosine_similarity(a, b, dim=0), atol=1e-6)
    np.testing.assert_allclose(records[1]["score"], 1.0, atol=1e-6)
    assert "corrupt.wav" in records[2]["error"] and "score" not in records[2]


# --------------------------------------------------------------------------- text


def test_fill_mask_from_text_and_a_file_with_the_checkpoints_own_tokenizer(tmp_path, capsys):
    from d2v_text.tokenizer import load_tokenizer

    spec = {"preset": "data2vec-text-tiny", "head": {"name": "masked_lm"}}
    # the spec names a tokenizer that is gone and BERT masking: prediction uses the saved one and never masks
    processor = {**TEXT, "tokenizer": str(tmp_path / "gone"), "masking": {"name": "bert", "mask_prob": 0.5}}
    model = save_checkpoint(tmp_path / "final", spec, processor, seed=4)
    tokenizer = load_tokenizer(TOKENIZER)
    tokenizer.save(tmp_path / "final")
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat sat on the <mask> .\n\nfive <mask> nine\n")
    code, records, _ = cli([str(tmp_path / "final"), str(lines), "--text", "one two <mask>", "--top-k", "4"], capsys)
    assert code == 0
    assert [r["input"] for r in records] == ["one two <mask>", f"{lines}:1", f"{lines}:3"]
    text = "the cat sat on the <mask> ."
    ids = torch.tensor([tokenizer.encode(text).ids])
    with torch.no_grad():
        probs = model({"inputs": ids}).logits.softmax(-1)[0]
    position = int((ids[0] == tokenizer.mask_token_id).nonzero())
    candidates = records[1]["masks"][0]
    assert [c["token_id"] for c in candidates] == probs[position].topk(4).indices.tolist()
    np.testing.assert_allclose([c["score"] for c in candidates], probs[position].topk(4).values, atol=1e-6)
    filled = ids[0].clone()
    filled[position] = candidates[0]["token_id"]
    assert candidates[0]["sequence"] == tokenizer.decode(filled.tolist())
    assert candidates[0]["token"] == tokenizer.decode([candidates[0]["token_id"]])


def test_text_generation_and_next_token(tmp_path, capsys):
    from d2v_heads.text.causal_lm import generate
    from d2v_text.tokenizer import load_tokenizer

    spec = {"preset": "data2vec-text-tiny", "encoder": {"is_decoder": True}, "head": {"name": "causal_lm"}}
    model = save_checkpoint(tmp_path / "final", spec, TEXT, seed=5)
    tokenizer = load_tokenizer(TOKENIZER)
    prompts = ["one two three", "the"]
    code, records, _ = cli([str(tmp_path / "final"), *sum((["--text", p] for p in prompts), []),
                            "--max-new-tokens", "6"], capsys)
    assert code == 0
    for prompt, record in zip(prompts, records):
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.pieces(prompt).ids]])  # no closing </s>
        generated = generate(model, ids, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)
        expected = generated[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
        assert record["new_tokens"] == expected
        assert record["generated_text"] == tokenizer.decode(ids[0].tolist() + expected)
    nxt = pipeline("next-token", model=str(tmp_path / "final"), top_k=3)("one two three")
    with torch.no_grad():
        prompt = torch.tensor([[tokenizer.bos_token_id, *tokenizer.pieces("one two three").ids]])
        logits = model({"inputs": prompt}).logits
    assert [t["token_id"] for t in nxt["next_tokens"]] == logits[0, -1].topk(3).indices.tolist()


def test_top_k_and_the_sampling_pool_are_separate_options(tmp_path, capsys):
    """--top-k is how many candidates a result lists; --sample-top-k is generation's sampling pool:
    setting one never changes what the other does."""
    spec = {"preset": "data2vec-text-tiny", "encoder": {"is_decoder": True}, "head": {"name": "causal_lm"}}
    save_checkpoint(tmp_path / "final", spec, TEXT, seed=5)
    model = str(tmp_path / "final")
    prompt = ["--text", "one two three", "--max-new-tokens", "8"]
    sampled = ["--sample", "--seed", "0", "--temperature", "2.0"]
    tokens = {top_k: cli([model, *prompt, *sampled, "--top-k", top_k], capsys)[1][0]["new_tokens"]
              for top_k in ("1", "5", "50")}
    assert tokens["1"] == tokens["5"] == tokens["50"]
    greedy = cli([model, *prompt], capsys)[1][0]["new_tokens"]
    assert cli([model, *prompt, *sampled, "--sample-top-k", "1"], capsys)[1][0]["new_tokens"] == greedy
    assert cli([model, *prompt, *sampled, "--sample-top-k", "0"], capsys)[1][0]["new_tokens"] != greedy
    for pool in ("1", "40"):
        code, records, _ = cli([model, "--task", "next-token", "--text", "one two", "--top-k", "3",
                                "--sample-top-k", pool], capsys)
        assert code == 0 and len(records[0]["next_tokens"]) == 3


def test_text_classification_scores_are_the_softmax_of_the_logits(tmp_path, capsys):
    from d2v_text.tokenizer import load_tokenizer

    spec = {"preset": "data2vec-text-tiny", "head": {"name": "text_classification", "label_names": ["neg", "pos"]}}
    model = save_checkpoint(tmp_path / "final", spec, TEXT, seed=6)
    tokenizer = load_tokenizer(TOKENIZER)
    texts = ["a rather long sentence with many words in it", "short"]
    results = pipeline(model=str(tmp_path / "final"), batch_size=2)(texts)
    for text, result in zip(texts, results):
        with torch.no_grad():
            probs = model({"inputs": torch.tensor([tokenizer.encode(text).ids])}).logits.softmax(-1)[0]
        assert result["label"] == ["neg", "pos"][int(probs.argmax())]
        np.testing.assert_allclose(sorted(c["score"] for c in result["top_k"]), sorted(probs.tolist()), atol=1e-5)
    # one batch per text: a progress bar on stderr from 4 batches on, and the same results
    capsys.readouterr()
    one_by_one = pipeline(model=str(tmp_path / "final"), batch_size=1, progress=True)(texts * 2)
    assert "4/4" in capsys.readouterr().err
    for a, b in zip(one_by_one, results * 2):
        np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)


def test_token_classification_words_entities_and_spans(tmp_path):
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    spec = {"preset": "data2vec-text-tiny", "head": {"name": "token_classification", "label_names": labels}}
    model = save_checkpoint(tmp_path / "final", spec, TEXT, seed=7)
    text = "one  two three four five"
    result = pipeline(model=str(tmp_path / "final"))(text)
    from d2v_text.tokenizer import load_tokenizer

    enc = load_tokenizer(TOKENIZER).encode_words(text.split())
    with torch.no_grad():
        probs = model({"inputs": torch.tensor([enc.ids])}).logits.softmax(-1)[0]
    first = [enc.word_ids.index(w) for w in range(5)]
    assert [w["entity"] for w in result["words"]] == [labels[int(probs[t].argmax())] for t in first]
    np.testing.assert_allclose([w["score"] for w in result["words"]], [float(probs[t].max()) for t in first], atol=1e-6)
    assert [text[w["start"]:w["end"]] for w in result["words"]] == text.split()
    for entity in result["entities"]:
        assert text[entity["start"]:entity["end"]] == entity["word"]


def test_question_answering_from_the_cli_and_multiple_choice(tmp_path, capsys):
    qa = save_checkpoint(tmp_path / "qa", {"preset": "data2vec-text-tiny", "head": {"name": "question_answering"}},
                         {**TEXT, "max_length": 32, "stride": 8, "max_query_length": 8}, seed=8)
    context = "the seven cats sat on the red mat while the three dogs slept near the door of the house"
    code, records, _ = cli([str(tmp_path / "qa"), "--text", context, "--question", "where did the cats sit"], capsys)
    assert code == 0
    answer = records[0]
    assert answer["answer"] == context[answer["start"]:answer["end"]] and answer["answer"]
    assert 0.0 < answer["score"] <= 1.0
    head_answer = pipeline(model=str(tmp_path / "qa"))({"question": "where did the cats sit", "context": context})
    assert head_answer["answer"] == answer["answer"]
    del qa

    spec = {"preset": "data2vec-text-tiny", "encoder": {"add_pooling_layer": True}, "head": {"name": "multiple_choice"}}
    mc = save_checkpoint(tmp_path / "mc", spec, TEXT, seed=9)
    code, records, _ = cli([str(tmp_path / "mc"), "--text", "the cat", "--choice", "sat", "--choice", "flew away"],
                           capsys)
    from d2v_text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    rows = [tokenizer.encode("the cat", c).ids for c in ("sat", "flew away")]
    width = max(map(len, rows))
    inputs = torch.full((1, 2, width), tokenizer.pad_token_id)
    for k, row in enumerate(rows):
        inputs[0, k, :len(row)] = torch.tensor(row)
    with torch.no_grad():
        probs = mc({"inputs": inputs, "padding_mask": inputs == tokenizer.pad_token_id}).logits.softmax(-1)[0]
    assert code == 0 and records[0]["choice"] == int(probs.argmax())
    np.testing.assert_allclose(records[0]["scores"], probs, atol=1e-5)


# --------------------------------------------------------------------------- images


def test_image_classification_on_pngs_of_any_size_and_mode(tmp_path, image_files, capsys):
    from d2v_vision.processor import ImageProcessor

    names = ["circle", "cross", "square", "triangle"]
    spec = {"preset": "data2vec-vision-tiny", "head": {"name": "image_classification", "label_names": names}}
    model = save_checkpoint(tmp_path / "final", spec, IMAGE, seed=10)
    code, records, err = cli([str(tmp_path / "final"), str(image_files / "*.png"), "--top-k", "4",
                              "--allow-failures"], capsys)
    assert code == 0 and "broken.png" in err
    by_name = {Path(r["input"]).name: r for r in records}
    assert "error" in by_name["broken.png"]
    for name in ("wide.png", "grey.png"):
        with Image.open(image_files / name) as image:
            pixels = ImageProcessor(size=32, crop_size=32)([image])
        with torch.no_grad():
            probs = model({"inputs": pixels}).logits.softmax(-1)[0]
        result = by_name[name]
        assert [c["label"] for c in result["top_k"]] == [names[i] for i in probs.topk(4).indices]
        np.testing.assert_allclose([c["score"] for c in result["top_k"]], probs.topk(4).values, atol=1e-5)


def test_segmentation_writes_png_masks_at_the_image_size(tmp_path, image_files, capsys):
    from d2v_vision.processor import ImageProcessor

    names = ["background", "circle", "square"]
    spec = {"preset": "data2vec-vision-tiny",
            "head": {"name": "semantic_segmentation", "label_names": names, "out_indices": [1, 2, 3, 4],
                     "pool_scales": [1, 2], "auxiliary_channels": 8}}
    model = save_checkpoint(tmp_path / "final", spec, {**IMAGE, "augment": False}, seed=11)
    out = tmp_path / "results" / "seg.jsonl"
    out.parent.mkdir()
    code, _, _ = cli([str(tmp_path / "final"), str(image_files / "wide.png"), str(image_files / "grey.png"),
                      "--out", str(out)], capsys)
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for record, name in zip(records, ("wide.png", "grey.png")):
        with Image.open(image_files / name) as image:
            size = (image.height, image.width)
            pixels = ImageProcessor(size=32, crop_size=32)([image])
        with torch.no_grad():
            logits = model({"inputs": pixels}).logits
        expected = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)[0]
        mask_path = Path(record["mask"])
        assert mask_path.parent == out.parent and mask_path.suffix == ".png"
        mask = np.asarray(Image.open(mask_path))
        assert mask.shape == size
        np.testing.assert_array_equal(mask, expected.numpy())
        counts = np.bincount(expected.flatten().numpy(), minlength=3)
        assert {e["label"]: e["fraction"] for e in record["labels"]} == {
            names[c]: counts[c] / counts.sum() for c in range(3) if counts[c]}


# --------------------------------------------------------------------------- errors


def test_bad_requests_are_one_clear_error(tmp_path, audio_files, capsys):
    from d2v.api.errors import SpecError

    spec = {"preset": "data2vec-audio-tiny", "head": {"name": "audio_classification", "label_names": KEYWORDS,
                                                      "classifier_proj_size": 16}}
    save_checkpoint(tmp_path / "final", spec, AUDIO)
    with pytest.raises(SpecError, match="does audio-classification"):
        pipeline("fill-mask", model=str(tmp_path / "final"))
    with pytest.raises(SpecError, match="does not score pairs"):
        cli([str(tmp_path / "final"), "--verify", str(audio_files / "tone16k.wav"), str(audio_files / "tone16k.wav")],
            capsys)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="holds no model"):
        pipeline(model=str(tmp_path / "empty"))
    code, records, err = cli([str(tmp_path / "final"), str(tmp_path / "missing.wav")], capsys)
    assert code == 1 and "missing.wav" in records[0]["error"] and "missing.wav" in err


def test_exit_status_is_1_when_any_input_failed_unless_failures_are_allowed(tmp_path, audio_files, capsys):
    """A script sees failed inputs in the exit status (1), not only in the JSON lines; with
    --allow-failures a partly failed run exits 0, one where nothing could be read still 1."""
    spec = {"preset": "data2vec-audio-tiny", "head": {"name": "audio_classification", "label_names": KEYWORDS,
                                                      "classifier_proj_size": 16}}
    save_checkpoint(tmp_path / "final", spec, AUDIO)
    good, bad, missing = (str(audio_files / "tone16k.wav"), str(audio_files / "corrupt.wav"),
                          str(tmp_path / "missing.wav"))
    code, records, err = cli([str(tmp_path / "final"), good, bad, missing], capsys)
    assert code == 1
    assert [("error" in r) for r in records] == [False, True, True]  # the failures stay listed
    assert "corrupt.wav" in err and "missing.wav" in err
    assert f"audio file '{missing}' does not exist" in records[2]["error"]  # not libsndfile's "System error."
    assert cli([str(tmp_path / "final"), good, bad, "--allow-failures"], capsys)[0] == 0
    assert cli([str(tmp_path / "final"), bad, missing, "--allow-failures"], capsys)[0] == 1
    assert cli([str(tmp_path / "final"), good], capsys)[0] == 0


def test_compiled_fixed_shape_prediction_equals_eager(tmp_path, audio_files, capsys):
    """``--compile`` pads each batch to a bucket length (a few fixed shapes, each compiled once)
    and predicts what the eager model does: CTC transcripts and text-classification scores."""
    ctc = {"preset": "data2vec-audio-tiny", "head": {"name": "ctc", "vocab": "librispeech"}}
    save_checkpoint(tmp_path / "asr", ctc, AUDIO, seed=3)
    files = [str(audio_files / "tone16k.wav"), str(audio_files / "stereo44k.wav")]
    eager = pipeline(model=str(tmp_path / "asr"), device="cpu", batch_size=1)(files)
    code, compiled, _ = cli([str(tmp_path / "asr"), *files, "--device", "cpu", "--batch-size", "1",
                             "--compile", "eager", "--pad-to-multiple-of", "4000"], capsys)
    assert code == 0 and [{k: r[k] for k in ("input", "text")} for r in compiled] == eager

    spec = {"preset": "data2vec-text-tiny", "head": {"name": "text_classification", "label_names": ["neg", "pos"]}}
    save_checkpoint(tmp_path / "cls", spec, TEXT, seed=6)
    texts = ["a rather long sentence with many words in it", "short", "two words"]
    plain = pipeline(model=str(tmp_path / "cls"), batch_size=1)(texts)
    pipe = pipeline(model=str(tmp_path / "cls"), batch_size=1, compile={"backend": "eager"})
    shapes = []
    original = pipe.processor.pad_batch
    pipe.processor.pad_batch = lambda batch, length: shapes.append(length) or original(batch, length)
    bucketed = pipe(texts)
    assert set(shapes) == {32}  # every text padded to one 32-token bucket
    for a, b in zip(bucketed, plain):
        assert a["label"] == b["label"]
        np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
