"""Noise, babble and mixing at an SNR: the one augmentation module.

Used by the demo corpus (noise files, conversations), teacher training (noisy crops) and
pretraining (the denoising corruption). Levels are measured on *active speech* (an energy VAD),
ITU P.56 in spirit, so utterances with long pauses are not over-noised.

* ``active_speech_mask`` / ``speech_segments`` / ``active_rms``: where and how loud the speech is.
* ``coloured_noise`` (white/pink/brown, 1/f^alpha), ``make_babble`` (several talkers at once),
  ``NoiseSource`` (recordings from a folder, else generated noise and babble).
* ``mix_at_snr``: add an interferer at an SNR (active-speech or whole-signal level).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

SAMPLING_RATE = 16000

__all__ = [
    "NOISE_COLOURS",
    "NoiseSource",
    "active_rms",
    "active_speech_mask",
    "coloured_noise",
    "fit_length",
    "make_babble",
    "mix_at_snr",
    "speech_segments",
]


def _frame_energy_db(x: np.ndarray, frame: int, hop: int) -> np.ndarray:
    """Per-frame power in dB (frames of `frame` samples every `hop`); at least one frame.

    Uses a cumulative sum of squares: O(N) time and memory, so hour-long inputs are fine.
    """
    if x.shape[0] < frame:
        x = np.pad(x, (0, frame - x.shape[0]))
    n = 1 + (x.shape[0] - frame) // hop
    csum = np.concatenate([[0.0], np.cumsum(np.square(x, dtype=np.float64))])
    starts = hop * np.arange(n)
    power = np.maximum(csum[starts + frame] - csum[starts], 0.0) / frame
    return 10.0 * np.log10(power + 1e-20)


def active_speech_mask(
    x: np.ndarray,
    sr: int = SAMPLING_RATE,
    threshold_db: float = 35.0,
    floor_dbfs: float = -70.0,
    frame_ms: float = 20.0,
) -> np.ndarray:
    """Boolean per-sample mask of active speech (energy VAD).

    A frame is active when its power is within `threshold_db` of the loudest frame and above
    `floor_dbfs`. Good enough for clean synthetic speech, where pauses are near-silent; the
    point is to measure speech level without the pauses (ITU P.56 in spirit).
    """
    x = np.asarray(x, dtype=np.float32)
    hop = max(1, int(sr * frame_ms / 2000))
    frame = 2 * hop
    energy = _frame_energy_db(x, frame, hop)
    starts = hop * np.flatnonzero((energy > energy.max() - threshold_db) & (energy > floor_dbfs))
    # +1 at each active frame's start, -1 at its end: a running sum > 0 marks covered samples.
    edges = np.zeros(max(x.shape[0], frame) + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + frame, -1)
    return np.cumsum(edges)[: x.shape[0]] > 0


def speech_segments(
    x: np.ndarray,
    sr: int = SAMPLING_RATE,
    min_gap: float = 0.25,
    min_duration: float = 0.05,
    **mask_kwargs: Any,
) -> list[tuple[float, float]]:
    """Active-speech intervals ``[(start_s, end_s), ...]``; pauses shorter than `min_gap`
    are bridged (diarization references do not split a turn at every stop consonant)."""
    mask = active_speech_mask(x, sr, **mask_kwargs)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    segments: list[list[float]] = []
    for start, end in zip(edges[::2], edges[1::2]):
        s, e = start / sr, end / sr
        if segments and s - segments[-1][1] < min_gap:
            segments[-1][1] = e
        else:
            segments.append([s, e])
    return [(s, e) for s, e in segments if e - s >= min_duration]


def active_rms(x: np.ndarray, sr: int = SAMPLING_RATE) -> float:
    """RMS over active-speech samples only (0.0 for silence)."""
    x = np.asarray(x, dtype=np.float32)
    mask = active_speech_mask(x, sr)
    if not mask.any():
        return 0.0
    return float(np.sqrt(np.mean(np.square(x[mask], dtype=np.float64))))


NOISE_COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0}


def coloured_noise(
    num_samples: int, colour: str | float = "pink", rng: np.random.Generator | None = None
) -> np.ndarray:
    """Gaussian noise with a 1/f^alpha power spectrum, shaped in the FFT domain, unit RMS.

    `colour` is "white" (alpha 0), "pink" (1), "brown" (2) or an alpha value. DC is removed
    so brown noise does not wander off zero.
    """
    alpha = NOISE_COLOURS[colour] if isinstance(colour, str) else float(colour)
    rng = rng if rng is not None else np.random.default_rng()
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs = np.arange(spectrum.shape[0], dtype=np.float64)
    freqs[0] = 1.0
    spectrum *= freqs ** (-alpha / 2.0)
    spectrum[0] = 0.0
    noise = np.fft.irfft(spectrum, n=num_samples)
    rms = np.sqrt(np.mean(noise**2))
    return (noise / (rms + 1e-12)).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def fit_length(noise: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop, or tile from a random offset, to exactly `length` samples."""
    if noise.shape[0] == 0:
        raise ValueError("noise is empty")
    if noise.shape[0] >= length:
        start = int(rng.integers(0, noise.shape[0] - length + 1))
        return noise[start : start + length]
    reps = int(np.ceil(length / noise.shape[0])) + 1
    start = int(rng.integers(0, noise.shape[0]))
    return np.tile(noise, reps)[start : start + length]


def mix_at_snr(
    clean: Any,
    noise: Any,
    snr_db: float,
    sr: int = SAMPLING_RATE,
    rng: np.random.Generator | None = None,
    return_noise: bool = False,
    level: str = "active",
):
    """Add `noise` to `clean` at `snr_db`, measured against active speech only.

    Measuring the speech level on active frames keeps the SNR meaningful for utterances with
    long pauses (whole-signal power would under-state speech and over-noise them);
    ``level="power"`` measures the whole signal instead (for crops that are all speech, where the
    VAD costs time and changes nothing). The noise is randomly cropped (or tiled) to the clean length. numpy arrays or 1-D torch tensors are
    accepted; the result has the input's type and ``float32`` precision. Silent `clean` input
    is returned unchanged (there is no speech level to refer to).

    Returns: the mixture, or ``(mixture, scaled_noise)`` when `return_noise` is set.
    """
    as_torch = type(clean).__module__.startswith("torch")
    clean_np = clean.detach().cpu().numpy() if as_torch else np.asarray(clean)
    noise_np = noise.detach().cpu().numpy() if hasattr(noise, "detach") else np.asarray(noise)
    clean_np = clean_np.astype(np.float32, copy=False)
    rng = rng if rng is not None else np.random.default_rng()
    segment = fit_length(noise_np.astype(np.float32, copy=False), clean_np.shape[0], rng)
    if level not in ("active", "power"):
        raise ValueError(f"level must be 'active' or 'power', got {level!r}")
    speech_rms = active_rms(clean_np, sr) if level == "active" else _rms(clean_np)
    noise_rms = _rms(segment)
    if speech_rms == 0.0 or noise_rms == 0.0:
        scaled = np.zeros_like(clean_np)
    else:
        scaled = (segment * (speech_rms / noise_rms / 10.0 ** (snr_db / 20.0))).astype(np.float32)
    mixture = clean_np + scaled
    if as_torch:
        import torch

        mixture, scaled = torch.from_numpy(mixture), torch.from_numpy(scaled)
    return (mixture, scaled) if return_noise else mixture


def make_babble(
    utterances: Sequence[np.ndarray],
    num_samples: int,
    num_talkers: int,
    rng: np.random.Generator,
    sr: int = SAMPLING_RATE,
) -> np.ndarray:
    """Babble noise: `num_talkers` simultaneous streams of randomly chosen utterances.

    Each stream concatenates utterances (random order, short random pauses) from a random
    offset and is scaled to the same active-speech level, so no single talker dominates.
    Use utterances of *training* speakers only, so evaluation speakers never leak in.
    Returns unit-RMS float32 audio.
    """
    if not utterances:
        raise ValueError("make_babble needs at least one utterance")
    babble = np.zeros(num_samples, dtype=np.float64)
    for _ in range(num_talkers):
        pieces: list[np.ndarray] = []
        total = 0
        while total < num_samples + sr:
            utt = np.asarray(utterances[int(rng.integers(len(utterances)))], dtype=np.float32)
            level = active_rms(utt, sr)
            pause = np.zeros(int(rng.uniform(0.05, 0.4) * sr), dtype=np.float32)
            pieces += [utt / (level + 1e-9), pause]
            total += utt.shape[0] + pause.shape[0]
        stream = np.concatenate(pieces)
        start = int(rng.integers(0, stream.shape[0] - num_samples + 1))
        babble += stream[start : start + num_samples]
    rms = np.sqrt(np.mean(babble**2))
    return (babble / (rms + 1e-12)).astype(np.float32)


class NoiseSource:
    """Noise for augmentation: recordings from ``noise_dir``, else generated noise.

    Generated noise is white, pink or brown (``coloured_noise``) or babble of 3-6 talkers made from
    the other utterances of the batch (``make_babble``), chosen uniformly. Recordings are decoded
    once and kept in memory (``max_seconds`` caps that).
    """

    KINDS = ("white", "pink", "brown", "babble")

    def __init__(self, noise_dir: str | None = None, max_seconds: float = 3600.0):
        self.recordings: list[np.ndarray] = []
        if noise_dir:
            from delulu_hf.audio import load_audio

            patterns = ("*.flac", "*.wav", "*.ogg", "*.mp3")
            files = sorted(
                p for pat in patterns for p in glob.glob(os.path.join(noise_dir, "**", pat), recursive=True)
            )
            if not files:
                raise FileNotFoundError(
                    f"noise_dir {noise_dir!r} holds no audio files ({', '.join(patterns)})"
                )
            budget = int(max_seconds * SAMPLING_RATE)
            for path in files:
                audio = load_audio(path, SAMPLING_RATE, name=path, min_samples=1)
                self.recordings.append(audio[:budget])
                budget -= len(self.recordings[-1])
                if budget <= 0:
                    break

    def sample(
        self, num_samples: int, rng: np.random.Generator, others: Sequence[np.ndarray] = ()
    ) -> tuple[np.ndarray, str]:
        """A noise signal (at least ``num_samples`` long, any level) and its kind."""
        if self.recordings:
            return self.recordings[int(rng.integers(len(self.recordings)))], "recording"
        kind = self.KINDS[int(rng.integers(len(self.KINDS)))]
        if kind == "babble":
            if not others:
                kind = "pink"
            else:
                talkers = int(rng.integers(3, 7))
                return make_babble(list(others), num_samples, talkers, rng), "babble"
        return coloured_noise(num_samples, kind, rng), kind
