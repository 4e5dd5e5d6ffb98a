"""delulu_hf.audio: decoding from every input kind, resampling/downmix values, bad inputs,
and load_audio_dataset from every source kind, all without FFmpeg/torchcodec."""

from __future__ import annotations

import io
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from audio_fixtures import (
    BAD_INPUT_ERRORS,
    STEREO_LEFT_GAIN,
    STEREO_RIGHT_GAIN,
    TONE_HZ,
    tone,
    write_bad_audio_fixtures,
    write_tiny_audiofolder,
)

from delulu_hf.audio import MIN_SAMPLES, AudioDecodeError, load_audio, load_audio_dataset


@pytest.fixture(autouse=True)
def no_ffmpeg_decoders(monkeypatch):
    """Every test here runs as on a machine without FFmpeg: torchcodec cannot be imported
    and torchaudio.load fails, so any use of them would show up as an error."""
    monkeypatch.setitem(sys.modules, "torchcodec", None)

    def forbidden(*args, **kwargs):
        raise AssertionError("torchaudio.load must not be used (needs FFmpeg)")

    monkeypatch.setattr(torchaudio, "load", forbidden)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_bad_audio_fixtures(tmp_path_factory.mktemp("bad_audio"))


def dominant_frequency(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spectrum)])


# ---------------------------------------------------------------- input kinds


def test_every_input_kind_decodes_to_the_same_float32_mono(tmp_path):
    ref = tone(0.5)
    wav, flac = tmp_path / "a.wav", tmp_path / "a.flac"
    sf.write(wav, ref, 16000, subtype="FLOAT")
    sf.write(flac, ref, 16000, subtype="PCM_16")
    flac_bytes = flac.read_bytes()
    sources = {
        "path str": str(wav),
        "pathlib": wav,
        "bytes": wav.read_bytes(),
        "flac bytes": flac_bytes,
        "memoryview": memoryview(flac_bytes),
        "dict path": {"path": str(flac), "bytes": None},
        "dict bytes": {"path": "ignored.flac", "bytes": flac_bytes},
        "dict array": {"array": ref, "sampling_rate": 16000},
    }
    for kind, src in sources.items():
        out = load_audio(src)
        assert out.dtype == np.float32 and out.ndim == 1, kind
        np.testing.assert_allclose(out, ref, atol=1e-4, err_msg=kind)  # 16-bit FLAC: 3e-5 quantisation
    out = load_audio(torch.from_numpy(ref), source_sampling_rate=16000)
    np.testing.assert_array_equal(out, ref)


def test_integer_pcm_arrays_are_scaled_to_unit_range():
    out = load_audio(np.full(1000, 16384, dtype=np.int16), source_sampling_rate=16000)
    np.testing.assert_allclose(out, 0.5)
    out = load_audio(np.full(1000, 192, dtype=np.uint8), source_sampling_rate=16000)
    np.testing.assert_allclose(out, 0.5)


def test_downmix_values_file_and_both_array_layouts(fixtures):
    expected = (STEREO_LEFT_GAIN + STEREO_RIGHT_GAIN) / 2 * tone(1.0, amplitude=1.0)
    np.testing.assert_allclose(load_audio(fixtures["stereo"]), expected, atol=1e-6)
    stereo = np.stack([0.2 * tone(0.1, amplitude=1.0), 0.6 * tone(0.1, amplitude=1.0)])
    by_channels_first = load_audio(stereo, source_sampling_rate=16000)
    by_samples_first = load_audio(stereo.T, source_sampling_rate=16000)
    np.testing.assert_allclose(by_channels_first, 0.4 * tone(0.1, amplitude=1.0), atol=1e-6)
    np.testing.assert_array_equal(by_channels_first, by_samples_first)


@pytest.mark.parametrize("name,rate", [("rate_8k", 8000), ("rate_44k", 44100)])
def test_resampling_to_16k_keeps_length_frequency_and_level(fixtures, name, rate):
    out = load_audio(fixtures[name])
    assert out.shape == (16000,)
    assert abs(dominant_frequency(out, 16000) - TONE_HZ) <= 1.0
    core = out[1000:-1000]  # away from the filter's edge effects
    assert abs(np.sqrt(np.mean(core**2)) - 0.5 / np.sqrt(2)) < 0.01
    # The same numbers as torchaudio's own resampler (we only wrap it).
    src, _ = sf.read(fixtures[name], dtype="float32")
    ref = torchaudio.functional.resample(torch.from_numpy(src), rate, 16000).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_other_target_rate():
    out = load_audio({"array": tone(1.0), "sampling_rate": 16000}, sampling_rate=8000)
    assert out.shape == (8000,) and abs(dominant_frequency(out, 8000) - TONE_HZ) <= 1.0


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", sorted(BAD_INPUT_ERRORS))
def test_bad_input_files_raise_naming_the_item(fixtures, name):
    with pytest.raises(AudioDecodeError, match=BAD_INPUT_ERRORS[name]):
        load_audio(fixtures[name])


def test_bad_bytes_and_arrays_raise_with_the_given_name(fixtures):
    with pytest.raises(AudioDecodeError, match=r"^utt7: cannot decode audio"):
        load_audio(fixtures["corrupt"].read_bytes(), name="utt7")
    with pytest.raises(AudioDecodeError, match=r"^utt8: empty audio bytes"):
        load_audio(b"", name="utt8")
    with pytest.raises(AudioDecodeError, match=r"^x: contains 1 NaN/Inf"):
        load_audio(np.array([0.0] * 500 + [np.inf], dtype=np.float32), source_sampling_rate=16000, name="x")
    with pytest.raises(AudioDecodeError, match=r"source_sampling_rate is required"):
        load_audio(np.zeros(1000, dtype=np.float32))
    with pytest.raises(AudioDecodeError, match=r"empty audio \(0 samples\)"):
        load_audio(np.zeros(0, dtype=np.float32), source_sampling_rate=16000)
    with pytest.raises(AudioDecodeError, match=r"neither 'array', 'bytes' nor 'path'"):
        load_audio({"path": None, "bytes": None})


def test_missing_file_zero_frames_and_unsupported_rates(tmp_path):
    with pytest.raises(AudioDecodeError, match=r"nope\.wav: file not found"):
        load_audio(tmp_path / "nope.wav")
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(
        AudioDecodeError, match=r"zero\.wav: empty audio \(header is valid but holds 0 samples\)"
    ):
        load_audio(zero)
    low = tmp_path / "low.wav"
    sf.write(low, np.zeros(4000, dtype=np.float32), 2000)
    with pytest.raises(AudioDecodeError, match=r"low\.wav: unsupported sample rate 2000 Hz"):
        load_audio(low)
    with pytest.raises(AudioDecodeError, match=r"unsupported sample rate 22050.5 Hz"):
        load_audio(np.zeros(4000, dtype=np.float32), source_sampling_rate=22050.5)


def test_min_samples_is_the_receptive_field_by_default():
    assert MIN_SAMPLES == 322
    ok = np.full(322, 0.1, dtype=np.float32)
    assert load_audio(ok, source_sampling_rate=16000).shape == (322,)
    with pytest.raises(AudioDecodeError, match=r"321 samples at 16000 Hz, fewer than min_samples=322"):
        load_audio(ok[:321], source_sampling_rate=16000)
    assert load_audio(ok[:1], source_sampling_rate=16000, min_samples=0).shape == (1,)
    with pytest.raises(AudioDecodeError, match=r"min_samples=400"):
        load_audio(ok, source_sampling_rate=16000, min_samples=400)


def test_ten_minute_file_loads_and_max_seconds_rejects_it(fixtures):
    start = time.perf_counter()
    out = load_audio(fixtures["long_10min"])
    assert out.shape == (10 * 60 * 16000,) and out.dtype == np.float32
    assert time.perf_counter() - start < 20
    with pytest.raises(AudioDecodeError, match=r"long_10min\.flac: too long \(600\.0 s > max_seconds=60 s\)"):
        load_audio(fixtures["long_10min"], max_seconds=60)


# ---------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_audiofolder(tmp_path_factory.mktemp("tiny"), num_speakers=4, utterances_per_speaker=3)


def _check_decoded(ds, n_rows):
    assert ds.num_rows == n_rows
    item = ds[0]
    assert isinstance(item["audio"]["array"], np.ndarray) and item["audio"]["array"].dtype == np.float32
    assert int(item["audio"]["sampling_rate"]) == 16000
    return item


def test_audiofolder_split_column_file_name_and_values(tiny_folder, tmp_path):
    ds = load_audio_dataset(tiny_folder, split="test", cache_dir=str(tmp_path / "cache"))
    item = _check_decoded(ds, 6)
    assert set(ds["split"]) == {"test"} and {"speaker_id", "gender", "language", "text"} <= set(
        ds.column_names
    )
    np.testing.assert_array_equal(item["audio"]["array"], load_audio(tiny_folder / item["file_name"]))
    assert load_audio_dataset(tiny_folder, cache_dir=str(tmp_path / "cache")).num_rows == 12
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_audio_dataset(tiny_folder, split="dev", cache_dir=str(tmp_path / "cache"))


def test_audiofolder_resamples_and_streams(tmp_path):
    folder = write_tiny_audiofolder(
        tmp_path / "f8k", num_speakers=2, utterances_per_speaker=2, num_test_speakers=1, sampling_rate=8000
    )
    ds = load_audio_dataset(folder, cache_dir=str(tmp_path / "cache"))
    for row in ds:
        assert len(row["audio"]["array"]) == 2 * sf.info(folder / row["file_name"]).frames
    stream = load_audio_dataset(folder, split="train", streaming=True, cache_dir=str(tmp_path / "cache"))
    rows = list(stream)
    assert len(rows) == 2 and all(r["split"] == "train" for r in rows)
    assert isinstance(rows[0]["audio"]["array"], np.ndarray) and rows[0]["audio"]["sampling_rate"] == 16000


def test_audiofolder_bad_item_raises_or_is_skipped(tmp_path, fixtures):
    folder = write_tiny_audiofolder(tmp_path / "bad", num_speakers=2, utterances_per_speaker=2)
    (folder / "audio/spk00/spk00_001.flac").write_bytes(fixtures["corrupt"].read_bytes())
    cache = str(tmp_path / "cache")
    with pytest.raises(AudioDecodeError, match=r"spk00_001\.flac: cannot decode"):
        load_audio_dataset(folder, cache_dir=cache)
    ds = load_audio_dataset(folder, on_error="skip", cache_dir=cache)
    assert ds.num_rows == 3 and "audio/spk00/spk00_001.flac" not in ds["file_name"]


def _bytes_dataset(folder):
    """A datasets.Dataset with a real Audio feature holding FLAC bytes (as push_to_hub makes)."""
    import datasets

    meta = datasets.load_dataset("csv", data_files=str(folder / "metadata.csv"), split="train")
    storage = [{"bytes": (folder / f).read_bytes(), "path": f} for f in meta["file_name"]]
    ds = meta.add_column("audio", storage)
    # cast (not encode) so that no torchcodec is involved in building the fixture either
    return ds.cast_column("audio", datasets.Audio())


def test_parquet_arrow_saved_to_disk_and_hub_style_folder(tiny_folder, tmp_path):
    ds = _bytes_dataset(tiny_folder)
    cache = str(tmp_path / "cache")
    expected = load_audio(tiny_folder / ds["file_name"][0])

    parquet = tmp_path / "one.parquet"
    ds.to_parquet(str(parquet))
    hub_like = tmp_path / "hub_like" / "data"
    hub_like.mkdir(parents=True)
    ds.to_parquet(str(hub_like / "train-00000-of-00001.parquet"))
    saved = tmp_path / "saved"
    ds.save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))

    for source, kwargs in [
        (parquet, {}),
        (arrow, {}),
        (saved, {}),
        # a folder of parquet files goes through datasets.load_dataset like a Hub id
        (hub_like.parent, {"split": "train"}),
        (hub_like.parent, {"split": "test"}),  # no such HF split: falls back to the split column
    ]:
        out = load_audio_dataset(source, cache_dir=cache, **kwargs)
        n = 6 if kwargs.get("split") == "test" else 12
        item = _check_decoded(out, n)
        assert "speaker_id" in out.column_names and item["audio"]["array"].shape[0] > 0
        if n == 12:
            np.testing.assert_array_equal(item["audio"]["array"], expected)
    stream = load_audio_dataset(parquet, streaming=True, cache_dir=cache)
    first = next(iter(stream))
    np.testing.assert_array_equal(first["audio"]["array"], expected)
    # decode=False: bytes stay encoded (nothing decoded is cached); load_audio reads them later
    lazy = load_audio_dataset(saved, decode=False, cache_dir=cache)
    assert set(lazy[0]["audio"]) == {"bytes", "path"} and len(lazy) == 12
    np.testing.assert_array_equal(load_audio(lazy[0]["audio"]), expected)
    folder = load_audio_dataset(tiny_folder, split="train", decode=False, cache_dir=cache)
    assert folder[0]["audio"]["path"] == str(tiny_folder / folder[0]["file_name"])


def test_decoded_array_column_is_resampled(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"audio": [{"array": tone(1.0, 8000).tolist(), "sampling_rate": 8000}], "speaker_id": ["a"]}
    )
    ds.save_to_disk(str(tmp_path / "arr"))
    out = load_audio_dataset(tmp_path / "arr")
    assert out[0]["audio"]["array"].shape == (16000,)
    assert abs(dominant_frequency(out[0]["audio"]["array"], 16000) - TONE_HZ) <= 1.0


def test_wav_bytes_roundtrip_in_memory():
    buf = io.BytesIO()
    sf.write(buf, tone(0.2, 22050), 22050, format="WAV", subtype="PCM_16")
    out = load_audio({"bytes": buf.getvalue(), "path": None})
    assert out.shape == (3200,)
