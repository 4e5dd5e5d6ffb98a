"""Synthetic-but-real-voice demo data: MBROLA synthesis, noise and mixing helpers.

Two groups of tools live here:

* **Conversations**: multi-speaker mixtures with their reference segments (``build_conversation``,
  ``overlap_ratio``), used for the demo mixtures and by the evaluation suite. Noise, babble and
  SNR mixing live in ``delulu_hf.augment``, RTTM I/O in ``delulu_hf.segments``.
* **Corpus synthesis** used by ``training/make_demo_corpus.py``: plans and renders the corpus
  with the 58 MBROLA voices of ``delulu_hf.demo_voices`` (diphone databases recorded from one
  real person each; espeak-ng as the text front end, mbrola for the voice), sox for resampling
  and a random per-utterance channel. Everything is deterministic given a seed.

Why MBROLA: no public speech corpus is reachable at run time, but each MBROLA database is
one real speaker, so espeak-ng + MBROLA yields dozens of distinct real voices offline. The
voices are free for non-commercial use only (see data/demo_corpus/README.md).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from delulu_hf.atomic import atomic_write_text
from delulu_hf.augment import SAMPLING_RATE, active_rms, speech_segments
from delulu_hf.demo_voices import (  # noqa: F401  (DEBIAN_PACKAGES, missing_tools, database_path: re-exported)
    DEBIAN_PACKAGES,
    MBROLA_DIR,
    TEST_SPEAKERS,
    VOICES,
    VOICES_BY_ID,
    MbrolaVoice,
    database_path,
    learn_phoneme_renames,
    mbrola_synthesize,
    missing_tools,
    rename_phonemes,
    run_tool,
    text_to_pho,
)
from delulu_hf.segments import Segment


def build_conversation(
    utterances: Mapping[str, Sequence[np.ndarray]],
    rng: np.random.Generator,
    sr: int = SAMPLING_RATE,
    target_seconds: float = 8.0,
    max_seconds: float = 12.0,
    gap_range: tuple[float, float] = (-1.2, 0.4),
    gain_db_range: tuple[float, float] = (-3.0, 3.0),
) -> tuple[np.ndarray, list[Segment]]:
    """Simulate a conversation of the given speakers and return (audio, reference segments).

    Turns alternate between speakers (never the same speaker twice in a row; every speaker
    gets a turn first, in random order); each turn is one utterance starting `gap` seconds
    after the previous turn ended, with ``gap ~ U(gap_range)`` so negative gaps make
    overlaps. Turns are added until `target_seconds` is reached (but every speaker speaks).
    Each speaker gets a random gain in `gain_db_range` relative to a common active level.
    Reference segments come from the energy VAD of each utterance, offset by its start, so
    pauses inside a turn are not labelled as speech.
    """
    speakers = list(utterances)
    if not speakers:
        raise ValueError("build_conversation needs at least one speaker")
    order = [speakers[i] for i in rng.permutation(len(speakers))]
    gains = {s: 10.0 ** (rng.uniform(*gain_db_range) / 20.0) for s in speakers}
    used: dict[str, int] = dict.fromkeys(speakers, 0)
    placed: list[tuple[int, str, np.ndarray]] = []
    cursor_end = 0
    prev_start = 0
    turn = 0
    while True:
        if turn < len(order):
            speaker = order[turn]
        else:
            choices = [s for s in speakers if s != placed[-1][1]] or speakers
            speaker = choices[int(rng.integers(len(choices)))]
        pool = utterances[speaker]
        utt = np.asarray(pool[used[speaker] % len(pool)], dtype=np.float32)
        used[speaker] += 1
        start = cursor_end + int(rng.uniform(*gap_range) * sr) if placed else 0
        # Never start before the previous turn did: fully nested turns are unnatural.
        start = max(start, prev_start + int(0.3 * sr), 0) if placed else 0
        if placed and turn >= len(order) and start + utt.shape[0] > max_seconds * sr:
            break
        level = active_rms(utt, sr)
        placed.append((start, speaker, utt * (0.05 / (level + 1e-9)) * gains[speaker]))
        prev_start = start
        cursor_end = max(cursor_end, start + utt.shape[0])
        turn += 1
        if turn >= len(order) and cursor_end >= target_seconds * sr:
            break
    audio = np.zeros(max(s + u.shape[0] for s, _, u in placed), dtype=np.float32)
    segments: list[Segment] = []
    for start, speaker, utt in placed:
        audio[start : start + utt.shape[0]] += utt
        segments += [Segment(start / sr + a, start / sr + b, speaker) for a, b in speech_segments(utt, sr)]
    peak = float(np.abs(audio).max())
    if peak > 0.95:
        audio *= 0.95 / peak
    return audio, sorted(segments, key=lambda s: (s.start, s.speaker))


def overlap_ratio(segments: Iterable[Segment], resolution: float = 0.01) -> float:
    """Fraction of speech time (any speaker active) during which two or more speak."""
    segments = list(segments)
    if not segments:
        return 0.0
    n = int(np.ceil(max(s.end for s in segments) / resolution)) + 1
    count = np.zeros(n, dtype=np.int32)
    for s in segments:
        count[int(round(s.start / resolution)) : int(round(s.end / resolution))] += 1
    speech = (count > 0).sum()
    return float((count > 1).sum() / speech) if speech else 0.0


def write_csv_atomic(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> None:
    """Write a CSV atomically: readers never see a partial file."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue(), newline="")


# ======================================================================================
# Per-utterance channel
# ======================================================================================


@dataclass(frozen=True)
class ChannelParams:
    """A random recording channel, so that bandwidth, tilt and level stop identifying the
    voice (MBROLA databases differ in native bandwidth, 8-11 kHz, which a plain MFCC
    classifier otherwise exploits)."""

    lowpass_hz: float
    highpass_hz: float
    eq: tuple[tuple[float, float, float], ...]  # (centre Hz, Q, gain dB) peaking bands
    peak_dbfs: float

    def sox_effects(self) -> list[str]:
        effects = ["highpass", f"{self.highpass_hz:.0f}", "sinc", "-a", "60", f"-{self.lowpass_hz:.0f}"]
        for centre, q, gain in self.eq:
            effects += ["equalizer", f"{centre:.0f}", f"{q:.2f}q", f"{gain:+.2f}"]
        return effects + ["gain", "-n", f"{self.peak_dbfs:.2f}"]

    def describe(self) -> str:
        eq = ",".join(f"{c:.0f}/{q:.2f}/{g:+.1f}" for c, q, g in self.eq)
        return f"hp={self.highpass_hz:.0f} lp={self.lowpass_hz:.0f} eq={eq} peak={self.peak_dbfs:.1f}"


def sample_channel(rng: np.random.Generator) -> ChannelParams:
    """Low-pass 4-7.5 kHz, high-pass 40-160 Hz, two +-6 dB peaking EQ bands, peak -9..-1 dBFS."""
    eq = tuple(
        (
            float(np.exp(rng.uniform(np.log(150), np.log(3500)))),
            float(rng.uniform(0.7, 2.0)),
            float(rng.uniform(-6, 6)),
        )
        for _ in range(2)
    )
    return ChannelParams(
        lowpass_hz=float(rng.uniform(4000, 7500)),
        highpass_hz=float(rng.uniform(40, 160)),
        eq=eq,
        peak_dbfs=float(rng.uniform(-9, -1)),
    )


# ======================================================================================
# Corpus planning and rendering
# ======================================================================================


@dataclass(frozen=True)
class UtterancePlan:
    """Everything needed to render one utterance (picklable, for worker processes)."""

    file_name: str
    speaker_id: str
    voice: str
    gender: str
    language: str
    voice_language: str
    text: str
    split: str
    espeak_voice: str
    rate_wpm: int
    pitch: int
    pitch_ratio: float
    formant_ratio: float
    pseudo_speaker: bool
    channel: ChannelParams | None
    renames: dict[str, str] = field(default_factory=dict, compare=False)


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on the seed and the keys (e.g. a voice id), so a
    voice renders the same whether the full set or a subset is generated."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def _choose(rng: np.random.Generator, pool: Sequence[str], k: int) -> list[str]:
    """k items without replacement (cycling through a fresh permutation if k > len(pool))."""
    out: list[str] = []
    while len(out) < k:
        out += [pool[i] for i in rng.permutation(len(pool))][: k - len(out)]
    return out


def plan_voice(
    voice: MbrolaVoice,
    sentences: Mapping[str, Sequence[str]],
    seed: int,
    num_utterances: int,
    english_fraction: float = 0.5,
    split: str = "train",
    channel: bool = True,
    formant_ratio: float = 1.0,
) -> list[UtterancePlan]:
    """The utterances of one (pseudo-)speaker.

    Voices with an English route speak English for `english_fraction` of their
    utterances and their own language otherwise, so language is not a perfect proxy for
    speaker. Speaking rate (125-165 wpm) and espeak pitch (35-65) vary per utterance, as
    does the channel.
    """
    pseudo = formant_ratio != 1.0
    speaker_id = f"{voice.voice}_fs{round(formant_ratio * 100)}" if pseudo else voice.voice
    rng = _rng(seed, speaker_id)
    if voice.language == "en" or voice.english_voice is None:
        n_en = num_utterances if voice.language == "en" else 0
    else:
        n_en = int(round(num_utterances * english_fraction))
    texts = [("en", t) for t in _choose(rng, sentences["en"], n_en)] if n_en else []
    if num_utterances - n_en:
        texts += [(voice.language, t) for t in _choose(rng, sentences[voice.language], num_utterances - n_en)]
    # A formant-shifted vocal tract gets a matching pitch shift (a bigger/smaller speaker).
    base_pitch = formant_ratio**1.5
    plans = []
    for i, (lang, text) in enumerate(texts):
        english_route = lang == "en" and voice.language != "en"
        plans.append(
            UtterancePlan(
                file_name=f"audio/{speaker_id}/{speaker_id}_{i:03d}.flac",
                speaker_id=speaker_id,
                voice=voice.voice,
                gender=voice.gender,
                language=lang,
                voice_language=voice.voice_language,
                text=text,
                split=split,
                espeak_voice=voice.english_voice if english_route else voice.espeak_voice,
                rate_wpm=int(rng.integers(125, 166)),
                pitch=int(rng.integers(35, 66)),
                pitch_ratio=round(
                    (voice.english_pitch_ratio if english_route else voice.pitch_ratio) * base_pitch, 4
                ),
                formant_ratio=formant_ratio,
                pseudo_speaker=pseudo,
                channel=sample_channel(rng),
            )
        )
        if not channel:  # drawn anyway, so prosody matches the channel version exactly
            plans[-1] = dataclasses.replace(plans[-1], channel=None)
    return plans


def plan_corpus(
    sentences: Mapping[str, Sequence[str]],
    seed: int = 0,
    voices: Sequence[str] | None = None,
    test_speakers: Sequence[str] = TEST_SPEAKERS,
    num_utterances: int = 12,
    english_fraction: float = 0.5,
    pseudo_per_voice: int = 1,
    pseudo_utterances: int = 4,
    pseudo_formant_ratios: Sequence[float] = (0.86, 1.15),
    channel: bool = True,
) -> list[UtterancePlan]:
    """Plan the corpus: every voice in `voices` (default: all 58), split by `test_speakers`.

    Pseudo-speakers (formant-shifted copies, `mbrola -l`) are made from *train* voices
    only and always land in the train split: the shift makes a new identity for a
    speaker classifier (~20-30% EER against the source voice) but is too close to its
    source to be an honest test speaker.
    """
    chosen = [VOICES_BY_ID[v] for v in (voices or [v.voice for v in VOICES])]
    plans: list[UtterancePlan] = []
    for voice in chosen:
        split = "test" if voice.voice in test_speakers else "train"
        plans += plan_voice(voice, sentences, seed, num_utterances, english_fraction, split, channel)
        if split == "train" and pseudo_per_voice:
            # Rotate the ratio list per voice, so one pseudo-speaker per voice is sometimes
            # a larger (lower formants) and sometimes a smaller vocal tract.
            k = zlib.crc32(voice.voice.encode()) % len(pseudo_formant_ratios)
            ratios = list(pseudo_formant_ratios[k:]) + list(pseudo_formant_ratios[:k])
            for ratio in ratios[:pseudo_per_voice]:
                plans += plan_voice(
                    voice, sentences, seed, pseudo_utterances, english_fraction, split, channel, ratio
                )
    return plans


def _calibrate_route(job: tuple[str, str, tuple[str, ...], str]) -> tuple[tuple[str, str], tuple]:
    voice, espeak_voice, texts, mbrola_dir = job
    return (voice, espeak_voice), learn_phoneme_renames(voice, espeak_voice, list(texts), mbrola_dir)


def _render_job(job: tuple[UtterancePlan, str, str]) -> dict[str, Any]:
    return render_utterance(*job)


def render_corpus(
    plans: Sequence[UtterancePlan],
    out_dir: str | os.PathLike,
    sentences: Mapping[str, Sequence[str]],
    processes: int = 2,
    mbrola_dir: str = MBROLA_DIR,
    desc: str = "utterances",
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], tuple[dict[str, str], int, int]]]:
    """Render `plans` into `out_dir` with a progress bar, in `processes` worker processes.

    First calibrates phoneme renames once per (database, espeak voice) route, on the first
    6 sentences of the route's language (independent of the seed), then renders every
    utterance. Returns (metadata rows sorted by file name, {route: (renames, gaps before,
    gaps after)}).
    """
    from multiprocessing import Pool

    from tqdm import tqdm

    routes = sorted({(p.voice, p.espeak_voice, p.language) for p in plans})
    jobs = [(v, e, tuple(list(sentences[lang])[:6]), mbrola_dir) for v, e, lang in routes]
    pool = Pool(processes) if processes > 1 else None
    imap = pool.imap if pool is not None else map
    try:
        renames = dict(tqdm(imap(_calibrate_route, jobs), total=len(jobs), desc=f"{desc}: phoneme check"))
        fixed = [dataclasses.replace(p, renames=renames[(p.voice, p.espeak_voice)][0]) for p in plans]
        render_jobs = [(p, os.fspath(out_dir), mbrola_dir) for p in fixed]
        rows = list(tqdm(imap(_render_job, render_jobs), total=len(render_jobs), desc=desc))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return sorted(rows, key=lambda r: r["file_name"]), renames


def render_utterance(plan: UtterancePlan, out_dir: str, mbrola_dir: str = MBROLA_DIR) -> dict[str, Any]:
    """Synthesise one planned utterance into ``out_dir/plan.file_name`` (16 kHz mono FLAC).

    Returns its metadata row (plan fields + duration, diphone gaps, channel description).
    """
    import soundfile as sf

    target = os.path.join(out_dir, plan.file_name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    pho = rename_phonemes(text_to_pho(plan.text, plan.espeak_voice, plan.rate_wpm, plan.pitch), plan.renames)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.wav")
        gaps = mbrola_synthesize(pho, plan.voice, raw, plan.pitch_ratio, plan.formant_ratio, mbrola_dir)
        effects = ["rate", "-h", str(SAMPLING_RATE)]
        effects += plan.channel.sox_effects() if plan.channel else ["gain", "-n", "-3"]
        partial = os.path.join(tmp, "out.flac")
        # -D: no dither and -R: repeatable, so identical inputs give identical files.
        run_tool(["sox", "-D", "-R", raw, "-C", "8", "-b", "16", "-c", "1", partial, *effects])
        shutil.move(partial, target)  # a rename when on the same filesystem
    info = sf.info(target)
    row = {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("channel", "renames")}
    row.update(
        duration=round(info.frames / info.samplerate, 3),
        diphone_gaps=len(gaps),
        channel=plan.channel.describe() if plan.channel else "none",
    )
    return row


def make_trials(
    rows: Sequence[Mapping[str, Any]], seed: int = 0, nontargets_per_target: int = 1
) -> list[dict[str, Any]]:
    """Verification trials over the test split: every same-speaker pair once (target) and,
    per target, `nontargets_per_target` random different-speaker pairs with the same
    enrolment file (non-target). Paths are the corpus-relative ``file_name``."""
    rng = _rng(seed, "trials")
    test = sorted((r for r in rows if r["split"] == "test"), key=lambda r: r["file_name"])
    by_speaker: dict[str, list[str]] = {}
    for r in test:
        by_speaker.setdefault(r["speaker_id"], []).append(r["file_name"])
    trials: list[dict[str, Any]] = []
    for speaker, files in sorted(by_speaker.items()):
        others = [f for s, fs in sorted(by_speaker.items()) if s != speaker for f in fs]
        for i, enroll in enumerate(files):
            for test_file in files[i + 1 :]:
                trials.append({"enroll_file": enroll, "test_file": test_file, "target": 1})
                if not others:
                    continue
                for j in rng.choice(len(others), size=nontargets_per_target, replace=False):
                    trials.append({"enroll_file": enroll, "test_file": others[int(j)], "target": 0})
    return trials


# ======================================================================================
# Speaker distinctness (a data check, not the evaluation suite)
# ======================================================================================


def mfcc_stats_embedding(waveform: np.ndarray, sr: int = SAMPLING_RATE, n_mfcc: int = 20) -> np.ndarray:
    """Mean and std of 20 MFCCs (25 ms / 10 ms frames): the simplest speaker embedding,
    sensitive to channel cues on purpose, which is what the channel check measures."""
    import torch

    transform = _mfcc_transform(sr, n_mfcc)
    with torch.no_grad():
        mfcc = transform(torch.from_numpy(np.asarray(waveform, dtype=np.float32)))
    return torch.cat([mfcc.mean(dim=-1), mfcc.std(dim=-1)]).numpy()


@functools.lru_cache(maxsize=4)
def _mfcc_transform(sr: int, n_mfcc: int):
    import torchaudio

    return torchaudio.transforms.MFCC(
        sample_rate=sr, n_mfcc=n_mfcc, melkwargs={"n_fft": 400, "hop_length": 160, "n_mels": 40}
    )


def cosine_trials_eer(embeddings: Mapping[str, np.ndarray], trials: Sequence[Mapping[str, Any]]) -> float:
    """Equal error rate (fraction) of cosine scores over `trials` (enroll_file/test_file/target)."""
    from sklearn.metrics import roc_curve

    def unit(v: np.ndarray) -> np.ndarray:
        return v / (np.linalg.norm(v) + 1e-12)

    scores = [float(unit(embeddings[t["enroll_file"]]) @ unit(embeddings[t["test_file"]])) for t in trials]
    labels = [int(t["target"]) for t in trials]
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    return float((fpr[i] + fnr[i]) / 2.0)
