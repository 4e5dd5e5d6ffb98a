"""Synthetic-but-real-voice demo data: MBROLA synthesis, noise and mixing helpers.

Two groups of tools live here:

* **Conversations**: multi-speaker mixtures with their reference segments (``build_conversation``,
  ``overlap_ratio``), used for the demo mixtures and by the evaluation suite. Noise, babble and
  SNR mixing live in ``delulu_hf.augment``, RTTM I/O in ``delulu_hf.segments``.
* **Corpus synthesis** used by ``training/make_demo_corpus.py``: the table of the 58
  MBROLA voices (diphone databases recorded from one real person each), espeak-ng as the
  text front end, mbrola for the voice and sox for resampling and a random per-utterance
  channel. Everything is deterministic given a seed.

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
import re
import shutil
import subprocess
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from delulu_hf.atomic import atomic_write_text
from delulu_hf.augment import SAMPLING_RATE, active_rms, speech_segments
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
# MBROLA voices
# ======================================================================================

DEBIAN_PACKAGES = ("espeak-ng", "mbrola", "sox", "libsox-fmt-all")
MBROLA_DIR = "/usr/share/mbrola"


@dataclass(frozen=True)
class MbrolaVoice:
    """One MBROLA database = one real speaker.

    `espeak_voice` turns native text into this database's phoneme set; `english_voice`
    (when set) does the same for English text. A voice without its own ``mb-XX-en`` can
    borrow one from a database that shares its phoneme table (e.g. fr2 uses mb-fr1-en:
    both use ``fr_phtrans``), with `english_pitch_ratio` moving the borrowed prosody into
    the speaker's range.
    """

    voice: str
    gender: str  # "female" | "male"
    language: str  # key into the sentence lists (espeak-ng code)
    voice_language: str  # the speaker's own language/variety
    espeak_voice: str
    english_voice: str | None = None
    pitch_ratio: float = 1.0
    english_pitch_ratio: float = 1.0
    note: str = ""


def _v(voice: str, gender: str, language: str, voice_language: str | None = None, **kw: Any) -> MbrolaVoice:
    return MbrolaVoice(voice, gender, language, voice_language or language, f"mb-{voice}", **kw)


# The 58 voices of issue 4. Genders checked by ear/F0 (hu1 is female although Debian's
# description says male; cz1 is female but its espeak voice sets no pitch, so it is raised
# with mbrola -f). F0 ratios for borrowed English routes were measured (~100 Hz -> ~185 Hz).
VOICES: tuple[MbrolaVoice, ...] = (
    _v("ar1", "male", "ar"),
    _v("ar2", "male", "ar"),
    _v("br1", "male", "pt", "pt-br"),
    _v("br2", "female", "pt", "pt-br"),
    _v("br4", "female", "pt", "pt-br"),
    _v("ca1", "male", "fr", "fr-ca"),
    _v("ca2", "male", "fr", "fr-ca"),
    _v("cr1", "male", "hr"),
    _v("cz1", "female", "cs", pitch_ratio=1.8, note="degraded: missing diphones"),
    _v("cz2", "male", "cs"),
    _v("de1", "female", "de", english_voice="mb-de1-en"),
    _v("de2", "male", "de", english_voice="mb-de2-en"),
    _v("de3", "female", "de", english_voice="mb-de3-en"),
    _v("de4", "male", "de", english_voice="mb-de4-en"),
    _v("de6", "male", "de", english_voice="mb-de6-en"),
    _v("de7", "female", "de", english_voice="mb-de6-en", english_pitch_ratio=1.8),
    _v("de8", "male", "de", note="degraded: missing diphones"),
    _v("ee1", "male", "et"),
    _v("en1", "male", "en", "en-gb"),
    _v("es1", "male", "es"),
    _v("es2", "male", "es"),
    _v("es3", "female", "es", note="degraded: missing diphones"),
    _v("fr1", "male", "fr", english_voice="mb-fr1-en"),
    _v("fr2", "female", "fr", english_voice="mb-fr1-en", english_pitch_ratio=1.8),
    _v("fr3", "male", "fr", english_voice="mb-fr1-en"),
    _v("fr5", "male", "fr", "fr-be", english_voice="mb-fr1-en"),
    _v("fr6", "male", "fr", english_voice="mb-fr1-en"),
    _v("fr7", "male", "fr", english_voice="mb-fr1-en"),
    _v("gr1", "male", "el"),
    _v("gr2", "male", "el", english_voice="mb-gr2-en"),
    _v("hb1", "male", "he", note="degraded: missing diphones"),
    _v("hb2", "female", "he", note="degraded: missing diphones"),
    _v("hu1", "female", "hu", english_voice="mb-hu1-en"),
    _v("ic1", "male", "is"),
    _v("id1", "male", "id"),
    _v("in1", "male", "hi", note="degraded: missing diphones"),
    _v("in2", "female", "hi", note="degraded: missing diphones"),
    _v("ir1", "male", "fa"),
    _v("it1", "male", "it", note="degraded: missing diphones"),
    _v("it2", "female", "it", note="degraded: missing diphones"),
    _v("jp1", "male", "ja", note="degraded: missing diphones"),
    _v("jp2", "female", "ja"),
    _v("jp3", "female", "ja", note="degraded: missing diphones"),
    _v("la1", "male", "la"),
    _v("lt1", "male", "lt"),
    _v("ma1", "female", "ms", note="degraded: missing diphones"),
    _v("mx1", "male", "es", "es-mx"),
    _v("mx2", "male", "es", "es-mx"),
    _v("nl2", "male", "nl", english_voice="mb-nl2-en"),
    _v("nl3", "female", "nl", english_voice="mb-nl2-en", english_pitch_ratio=1.7),
    _v("nz1", "male", "mi"),
    _v("pl1", "female", "pl", english_voice="mb-pl1-en"),
    _v("sw1", "male", "sv", english_voice="mb-sw1-en"),
    _v("tl1", "female", "te"),
    _v("tr1", "male", "tr"),
    _v("us1", "female", "en", "en-us"),
    _v("us2", "male", "en", "en-us"),
    _v("vz1", "male", "es", "es-vz"),
)
VOICES_BY_ID: dict[str, MbrolaVoice] = {v.voice: v for v in VOICES}

# Held-out evaluation speakers: 6 female / 8 male, 12 languages, 7 of them English-capable
# (for an English-only subset), none of the degraded databases.
TEST_SPEAKERS: tuple[str, ...] = (
    "us2", "de3", "de6", "fr2", "fr6", "nl3", "pl1", "sw1", "br4", "jp2", "cz2", "es1", "tr1", "lt1",
)  # fmt: skip


def missing_tools() -> list[str]:
    """Names of the external programs the generator needs that are not on PATH."""
    return [tool for tool in ("espeak-ng", "mbrola", "sox") if shutil.which(tool) is None]


def database_path(voice: str, mbrola_dir: str = MBROLA_DIR) -> str:
    return os.path.join(mbrola_dir, voice, voice)


def _run(cmd: Sequence[str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), input=stdin, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}"
        )
    return proc


def text_to_pho(text: str, espeak_voice: str, rate_wpm: int = 175, pitch: int = 50) -> str:
    """espeak-ng front end: text -> MBROLA .pho (phoneme, duration, pitch targets).

    Text goes through stdin, never argv, so a sentence starting with "-" is not an option.
    """
    cmd = ["espeak-ng", "-v", espeak_voice, "-q", "--pho", "-s", str(rate_wpm), "-p", str(pitch), "--stdin"]
    pho = _run(cmd, text.encode("utf-8")).stdout.decode("utf-8", errors="replace")
    if not pho.strip():
        raise RuntimeError(f"espeak-ng -v {espeak_voice} produced no phonemes for {text!r}")
    return pho


_UNKNOWN_DIPHONE = re.compile(r"Warning: (\S+?)-(\S+) unknown")


def rename_phonemes(pho: str, renames: Mapping[str, str]) -> str:
    """Rename the phoneme (first field) of each .pho line; comments/blank lines kept."""
    if not renames:
        return pho
    out = []
    for line in pho.splitlines():
        fields = line.split(maxsplit=1)
        if fields and not line.startswith(";") and fields[0] in renames:
            line = renames[fields[0]] + (" " + fields[1] if len(fields) > 1 else "")
        out.append(line)
    return "\n".join(out) + "\n"


def mbrola_synthesize(
    pho: str,
    voice: str,
    out_wav: str,
    pitch_ratio: float = 1.0,
    formant_ratio: float = 1.0,
    mbrola_dir: str = MBROLA_DIR,
) -> list[tuple[str, str]]:
    """Run mbrola on a .pho text; returns the unknown diphones it replaced with silence.

    `formant_ratio` != 1 uses ``mbrola -l``: the database is resynthesised as if recorded
    at ``rate * formant_ratio``, which shifts all formants (a different vocal tract); the
    wav header then carries that rate and sox resamples it back.
    """
    cmd = ["mbrola", "-e"]
    if pitch_ratio != 1.0:
        cmd += ["-f", f"{pitch_ratio:.4f}"]
    if formant_ratio != 1.0:
        cmd += ["-l", str(int(round(database_sampling_rate(voice, mbrola_dir) * formant_ratio)))]
    cmd += [database_path(voice, mbrola_dir), "-", out_wav]
    proc = _run(cmd, pho.encode("utf-8"))
    return _UNKNOWN_DIPHONE.findall(proc.stderr.decode("utf-8", errors="replace"))


@functools.cache
def database_sampling_rate(voice: str, mbrola_dir: str = MBROLA_DIR) -> int:
    """Native rate of an MBROLA database (16000 or 22050 here), read from a tiny synthesis."""
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "probe.wav")
        _run(["mbrola", "-e", database_path(voice, mbrola_dir), "-", out], b"_ 50\n_ 50\n")
        return int(sf.info(out).samplerate)


def _rename_candidates(phoneme: str) -> list[str]:
    """Plausible stand-ins for a phoneme a database lacks, most specific first.

    espeak-ng 1.51 emits variants some databases never recorded (``e/ o/`` for Spanish,
    ``t. d.`` Telugu, ``L/`` Turkish, ``R`` Arabic, ``?`` glottal stop): strip the
    modifier, change case, or for a glottal stop use a short silence.
    """
    stripped = re.sub(r"[^A-Za-z@{}]+$", "", phoneme)
    cands = [stripped, stripped.lower(), stripped.upper(), phoneme.lower(), phoneme + ":"]
    if phoneme in ("?", "Q", '?"'):
        cands.insert(0, "_")
    seen: list[str] = []
    for c in cands:
        if c and c != phoneme and c not in seen:
            seen.append(c)
    return seen


def learn_phoneme_renames(
    voice: str,
    espeak_voice: str,
    texts: Sequence[str],
    mbrola_dir: str = MBROLA_DIR,
    max_suspects: int = 8,
) -> tuple[dict[str, str], int, int]:
    """Find phonemes espeak-ng emits but the database lacks, and stand-ins that work.

    A phoneme is suspect when at least half of the diphones it takes part in are unknown on
    the calibration `texts`; candidates from `_rename_candidates` are kept only when they
    reduce the total number of gaps. Deterministic for fixed inputs.

    Returns: (renames, gaps before, gaps after).
    """
    phos = [text_to_pho(t, espeak_voice) for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cal.wav")

        def gaps_with(renames: Mapping[str, str]) -> tuple[int, Counter, Counter]:
            unknown: Counter = Counter()
            total: Counter = Counter()
            n = 0
            for pho in phos:
                fixed = rename_phonemes(pho, renames)
                seq = [ln.split()[0] for ln in fixed.splitlines() if ln.strip() and not ln.startswith(";")]
                for a, b in zip(seq, seq[1:]):
                    total[a] += 1
                    total[b] += 1
                for a, b in mbrola_synthesize(fixed, voice, out, mbrola_dir=mbrola_dir):
                    unknown[a] += 1
                    unknown[b] += 1
                    n += 1
            return n, unknown, total

        renames: dict[str, str] = {}
        base, unknown, total = gaps_with(renames)
        best = base
        suspects = [p for p, c in unknown.most_common() if p != "_" and c >= 0.5 * total[p]][:max_suspects]
        for phoneme in suspects:
            for cand in _rename_candidates(phoneme):
                trial = {**renames, phoneme: cand}
                n, _, _ = gaps_with(trial)
                if n < best:
                    best, renames = n, trial
                    break
    return renames, base, best


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
        _run(["sox", "-D", "-R", raw, "-C", "8", "-b", "16", "-c", "1", partial, *effects])
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
