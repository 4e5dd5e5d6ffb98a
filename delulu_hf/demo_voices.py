"""The demo corpus's voices: the table of 58 MBROLA voices and the espeak-ng + mbrola tools that speak.

Each MBROLA diphone database was recorded from one real person, so espeak-ng (text -> phonemes)
plus mbrola (phonemes -> a voice) yields dozens of distinct real voices offline.
``delulu_hf.demo_corpus`` plans and renders the corpus with them. The voices are free for
non-commercial use only (see data/demo_corpus/README.md).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


def run_tool(cmd: Sequence[str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
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
    pho = run_tool(cmd, text.encode("utf-8")).stdout.decode("utf-8", errors="replace")
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
    proc = run_tool(cmd, pho.encode("utf-8"))
    return _UNKNOWN_DIPHONE.findall(proc.stderr.decode("utf-8", errors="replace"))


@functools.cache
def database_sampling_rate(voice: str, mbrola_dir: str = MBROLA_DIR) -> int:
    """Native rate of an MBROLA database (16000 or 22050 here), read from a tiny synthesis."""
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "probe.wav")
        run_tool(["mbrola", "-e", database_path(voice, mbrola_dir), "-", out], b"_ 50\n_ 50\n")
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
