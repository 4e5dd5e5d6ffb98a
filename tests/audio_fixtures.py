"""Generated audio fixtures shared by the tests of every stage (nothing large is committed).

Import from any test (pytest puts ``tests/`` on ``sys.path``)::

    from audio_fixtures import write_bad_audio_fixtures, write_tiny_audiofolder

* `write_bad_audio_fixtures(dir)` writes the inputs every stage must handle: a corrupt file,
  an empty file, a 1-sample file, a file with NaN samples, stereo, 8 kHz, 44.1 kHz and a
  10-minute file. `BAD_INPUT_ERRORS` maps the ones `delulu_hf.audio.load_audio` rejects to a
  regex that its error message matches; the others load fine.
* `write_tiny_audiofolder(dir)` writes a small audiofolder shaped like ``data/demo_corpus``
  (``metadata.csv`` with ``file_name,speaker_id,gender,language,text,split`` and
  ``trials.csv``), whose "speakers" are harmonic tones with speaker-specific pitch and
  spectral envelope: enough for fast pipeline tests, seconds to build.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000

# Fixture name -> regex matched by the AudioDecodeError that load_audio raises for it.
BAD_INPUT_ERRORS = {
    "corrupt": r"corrupt\.flac: cannot decode audio",
    "empty": r"empty\.wav: empty file \(0 bytes\)",
    "one_sample": r"one_sample\.wav: too short: 1 samples",
    "nan": r"nan\.wav: contains \d+ NaN/Inf sample",
}
# Fixtures that are valid and must load (to 16 kHz mono).
GOOD_INPUTS = ("stereo", "rate_8k", "rate_44k", "long_10min")
STEREO_LEFT_GAIN, STEREO_RIGHT_GAIN = 0.2, 0.6  # downmix must give their mean times the tone
TONE_HZ = 440.0


def tone(seconds: float, sr: int = SR, freq: float = TONE_HZ, amplitude: float = 0.5) -> np.ndarray:
    """A float32 sine, the reference signal for resampling/downmix value checks."""
    t = np.arange(int(round(seconds * sr))) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_bad_audio_fixtures(directory: str | Path, long_minutes: float = 10.0) -> dict[str, Path]:
    """Write every bad/edge-case input into `directory`; returns ``{name: path}``.

    Names: corrupt (FLAC magic + garbage), empty (0 bytes), one_sample (a 1-sample WAV),
    nan (float WAV with NaN samples), stereo (16 kHz, left = 0.2*tone, right = 0.6*tone),
    rate_8k, rate_44k (a 440 Hz tone, 1 s), long_10min (`long_minutes` of a quiet tone at
    16 kHz, FLAC; ~0.5 s to write).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = {
        "corrupt": d / "corrupt.flac",
        "empty": d / "empty.wav",
        "one_sample": d / "one_sample.wav",
        "nan": d / "nan.wav",
        "stereo": d / "stereo.wav",
        "rate_8k": d / "rate_8k.wav",
        "rate_44k": d / "rate_44k.wav",
        "long_10min": d / "long_10min.flac",
    }
    paths["corrupt"].write_bytes(
        b"fLaC\x00\x00\x00\x22" + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    )
    paths["empty"].write_bytes(b"")
    sf.write(paths["one_sample"], np.array([0.1], dtype=np.float32), SR, subtype="PCM_16")
    nan = tone(0.5)
    nan[100:110] = np.nan
    sf.write(paths["nan"], nan, SR, subtype="FLOAT")
    base = tone(1.0, amplitude=1.0)
    sf.write(
        paths["stereo"], np.stack([STEREO_LEFT_GAIN * base, STEREO_RIGHT_GAIN * base], axis=1), SR, "FLOAT"
    )
    sf.write(paths["rate_8k"], tone(1.0, 8000), 8000, subtype="FLOAT")
    sf.write(paths["rate_44k"], tone(1.0, 44100), 44100, subtype="FLOAT")
    sf.write(
        paths["long_10min"], tone(long_minutes * 60, amplitude=0.05), SR, subtype="PCM_16", format="FLAC"
    )
    return paths


def synthetic_voice(
    speaker: int, seconds: float, rng: np.random.Generator, sr: int = SR, text_seed: int = 0
) -> np.ndarray:
    """A crude "voice": harmonics of a speaker-specific f0 (95-250 Hz) shaped by a
    speaker-specific envelope, with syllable-rate (~4 Hz) amplitude modulation, pauses,
    and a little noise. Different speakers differ in pitch and timbre, like real ones."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = 95.0 + 31.0 * (speaker % 6) + 7.0 * (speaker // 6)
    f0_track = f0 * (1.0 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * t + rng.uniform(0, 6.28)))
    phase = 2 * np.pi * np.cumsum(f0_track) / sr
    formant = 500.0 + 170.0 * ((speaker * 7) % 9)
    signal = np.zeros(n)
    for k in range(1, int(3800 // f0)):
        weight = np.exp(-(((k * f0) - formant) ** 2) / (2 * 400.0**2)) + 0.3 / k
        signal += weight * np.sin(k * phase)
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3.0, 5.0) * t + text_seed), 0, None) ** 0.5
    signal = signal * syllables + 0.01 * rng.standard_normal(n)
    return (0.3 * signal / (np.abs(signal).max() + 1e-9)).astype(np.float32)


def write_tiny_audiofolder(
    directory: str | Path,
    num_speakers: int = 6,
    utterances_per_speaker: int = 4,
    seconds: float = 1.0,
    num_test_speakers: int = 2,
    sampling_rate: int = SR,
    seed: int = 0,
) -> Path:
    """Write a demo_corpus-shaped audiofolder of synthetic speakers; returns the folder.

    Layout: ``audio/spkNN/spkNN_MMM.flac`` (16-bit FLAC at `sampling_rate`),
    ``metadata.csv`` (file_name, speaker_id, gender, language, text, split, duration) with
    the last `num_test_speakers` speakers in split "test", and ``trials.csv``
    (enroll_file, test_file, target) over the test speakers (all pairs). Genders alternate
    and languages cycle en/de/fr so both splits have both genders.
    """
    d = Path(directory)
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(num_speakers):
        speaker = f"spk{s:02d}"
        split = "test" if s >= num_speakers - num_test_speakers else "train"
        for u in range(utterances_per_speaker):
            dur = seconds * rng.uniform(0.8, 1.2)
            audio = synthetic_voice(s, dur, rng, sr=sampling_rate, text_seed=u)
            rel = f"audio/{speaker}/{speaker}_{u:03d}.flac"
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(d / rel, audio, sampling_rate, subtype="PCM_16", format="FLAC")
            rows.append(
                dict(
                    file_name=rel,
                    speaker_id=speaker,
                    gender="female" if s % 2 else "male",
                    language=("en", "de", "fr")[s % 3],
                    text=f"synthetic utterance {u}",
                    split=split,
                    duration=round(len(audio) / sampling_rate, 3),
                )
            )
    _write_csv(d / "metadata.csv", rows)
    test = [r for r in rows if r["split"] == "test"]
    trials = [
        dict(
            enroll_file=a["file_name"],
            test_file=b["file_name"],
            target=int(a["speaker_id"] == b["speaker_id"]),
        )
        for a, b in itertools.combinations(test, 2)
    ]
    _write_csv(d / "trials.csv", trials)
    return d


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# Salted files of `write_user_corpus`: file name -> what is wrong with it (each is left out when labelling).
SALTED_FILES = {
    "salted/corrupt.flac": "cannot decode",
    "salted/empty.wav": "empty file",
    "salted/blip.wav": "too short",  # 0.01 s: shorter than the encoder's receptive field
}


def write_user_corpus(
    directory: str | Path,
    source: str | Path,
    speakers: int = 4,
    per_speaker: int = 5,
    split: str = "train",
) -> Path:
    """An audiofolder shaped like a user's own corpus, from real recordings (e.g. ``data/demo_corpus``).

    The first `per_speaker` files of each of the first `speakers` speakers of `source` (rows of
    `split`) are re-encoded as WAV and FLAC at 8, 16 and 44.1 kHz (cycling), one as stereo, into
    ``audio/SPEAKER/NAME.wav|flac``; the salted files of `SALTED_FILES` (a corrupt FLAC, an empty
    WAV, a 0.01 s WAV) are added under ``salted/``. ``metadata.csv`` lists every file with its
    ``speaker_id`` (the salted ones under speaker ``salt``); there is no ``split`` column, as in most
    people's folders. Returns the folder.
    """
    from delulu_hf.audio import load_audio, resample

    d, source = Path(directory), Path(source)
    with open(source / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = [
            r
            for r in csv.DictReader(handle)
            if r.get("split", split) == split and r.get("pseudo_speaker") != "True"
        ]
    chosen: dict[str, list[dict]] = {}
    for row in rows:
        group = chosen.setdefault(row["speaker_id"], [])
        if len(group) < per_speaker and len(chosen) <= speakers:
            group.append(row)
    chosen = dict(list(chosen.items())[:speakers])
    formats = itertools.cycle(
        [("wav", 8000), ("flac", 16000), ("wav", 44100), ("flac", 8000), ("wav", 16000)]
    )
    out_rows = []
    for n, row in enumerate(r for group in chosen.values() for r in group):
        ext, rate = next(formats)
        wave = resample(load_audio(str(source / row["file_name"])), 16000, rate)
        if n == 1:  # one stereo file: two different gains of the same speech
            wave = np.stack([0.5 * wave, 0.9 * wave], axis=1)
        rel = f"audio/{row['speaker_id']}/{Path(row['file_name']).stem}.{ext}"
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(d / rel, wave, rate, subtype="PCM_16", format=ext.upper())
        out_rows.append({"file_name": rel, "speaker_id": row["speaker_id"]})
    (d / "salted").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (d / "salted/corrupt.flac").write_bytes(
        b"fLaC\x00\x00\x00\x22" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    )
    (d / "salted/empty.wav").write_bytes(b"")
    sf.write(d / "salted/blip.wav", tone(0.01), SR, subtype="PCM_16")
    out_rows += [{"file_name": name, "speaker_id": "salt"} for name in SALTED_FILES]
    _write_csv(d / "metadata.csv", out_rows)
    return d
