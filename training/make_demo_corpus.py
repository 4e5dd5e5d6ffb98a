#!/usr/bin/env python
"""Generate the embedded demo corpus from system TTS (espeak-ng -> .pho -> mbrola -> sox).

Writes three audiofolders (FLAC, 16 kHz mono, with metadata.csv):
  data/demo_corpus/    58 MBROLA voices (one real person each), speaker-disjoint
                       train/test split, trials.csv for the test speakers, README.md card
  data/demo_mixtures/  2-4 test speakers talking with overlaps, RTTM references
  data/demo_noise/     coloured noise (white/pink/brown) and babble from train speakers

It installs nothing. Needed Debian packages: espeak-ng, sox, libsox-fmt-all (main),
mbrola (contrib) and the voices mbrola-ar1 ... mbrola-vz1 (non-free). Debian's default
sources list only `main`; enable the others, e.g. for bookworm write
/etc/apt/sources.list.d/debian-nonfree.sources with
    Types: deb
    URIs: http://deb.debian.org/debian
    Suites: bookworm bookworm-updates
    Components: main contrib non-free
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
then `apt-get update && apt-get install espeak-ng sox libsox-fmt-all mbrola mbrola-us1 ...`.
The MBROLA voices are licensed for non-commercial use only.

Everything is deterministic given --seed; all files are written to a staging folder and
moved into place at the end, so readers never see a half-written corpus.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from delulu_hf import augment
from delulu_hf import demo_corpus as dc
from delulu_hf.atomic import atomic_write, atomic_write_text, replace_dir
from delulu_hf.audio import load_audio
from delulu_hf.cli import ArgumentParser, main_entry
from delulu_hf.errors import UserError
from delulu_hf.segments import write_rttm

REPO = Path(__file__).resolve().parents[1]
SENTENCES = Path(__file__).with_name("demo_sentences.json")
CORPUS_COLUMNS = [
    "file_name", "speaker_id", "gender", "language", "text", "split", "voice", "voice_language",
    "pseudo_speaker", "duration", "diphone_gaps", "espeak_voice", "rate_wpm", "pitch", "pitch_ratio",
    "formant_ratio", "channel",
]  # fmt: skip
MIXTURE_COLUMNS = [
    "file_name", "num_speakers", "rttm_file", "duration", "speakers", "overlap_ratio", "num_segments",
    "source_files",
]  # fmt: skip
NOISE_COLUMNS = ["file_name", "kind", "split", "num_talkers", "source_speakers", "duration"]


@dataclass
class CorpusArguments:
    data_dir: Path = field(default=REPO / "data", metadata={"help": "parent of the three output folders"})
    seed: int = field(default=0, metadata={"help": "everything generated is a function of this seed"})
    voices: list[str] | None = field(
        default=None, metadata={"help": "subset of voice ids, e.g. --voices us2 hb1 (none: all 58)"}
    )
    utterances_per_voice: int = field(default=12, metadata={"help": "utterances rendered per voice"})
    english_fraction: float = field(default=0.5, metadata={"help": "share of English for bilingual voices"})
    pseudo_per_voice: int = field(
        default=1,
        metadata={
            "help": "formant-shifted pseudo-speakers per TRAIN voice (0-2; training only, marked pseudo_speaker)"
        },
    )
    pseudo_utterances: int = field(default=4, metadata={"help": "utterances per pseudo-speaker"})
    no_channel: bool = field(default=False, metadata={"help": "skip the per-utterance random channel"})
    num_mixtures: int = field(default=36, metadata={"help": "0 to skip data/demo_mixtures"})
    noise_seconds: float = field(default=15.0, metadata={"help": "0 to skip data/demo_noise"})
    processes: int = field(default=2, metadata={"help": "synthesis worker processes"})
    mbrola_dir: str = field(default=dc.MBROLA_DIR, metadata={"help": "folder of the MBROLA voice databases"})
    sentences: Path = field(default=SENTENCES, metadata={"help": "JSON sentence lists, one per language"})
    measure_distinctness: bool = field(
        default=False,
        metadata={"help": "report MFCC-mean+std cosine EER on the test trials with and without the channel"},
    )
    no_card: bool = field(default=False, metadata={"help": "do not write data/demo_corpus/README.md"})

    def __post_init__(self) -> None:
        unknown = [v for v in self.voices or [] if v not in dc.VOICES_BY_ID]
        if unknown:
            raise ValueError(f"unknown voices: {' '.join(unknown)} (choose from {' '.join(dc.VOICES_BY_ID)})")


def parse_args(argv: list[str] | None = None) -> CorpusArguments:
    return ArgumentParser(CorpusArguments, prog="make_demo_corpus.py", description=__doc__).parse_one(argv)


def write_flac(path: Path, audio: np.ndarray) -> None:
    atomic_write(path, lambda tmp: sf.write(tmp, audio, dc.SAMPLING_RATE, subtype="PCM_16", format="FLAC"))


def build_mixtures(rows: list[dict], corpus_dir: Path, out_dir: Path, num: int, seed: int) -> list[dict]:
    """Conversations of 2, 3 and 4 test speakers (cycling), ~6-10 s, with RTTM references."""
    rng = dc._rng(seed, "mixtures")
    by_speaker: dict[str, list[str]] = {}
    for r in rows:
        if r["split"] == "test":
            by_speaker.setdefault(r["speaker_id"], []).append(r["file_name"])
    speakers = sorted(by_speaker)
    out = []
    if len(speakers) < 2:
        return out
    for i in tqdm(range(num), desc="mixtures"):
        n = min(2 + i % 3, len(speakers))
        chosen = sorted(rng.choice(speakers, size=n, replace=False).tolist())
        files = {s: rng.choice(by_speaker[s], size=3, replace=False).tolist() for s in chosen}
        utts = {s: [load_audio(corpus_dir / f) for f in fs] for s, fs in files.items()}
        audio, segments = dc.build_conversation(utts, rng, target_seconds=float(rng.uniform(6, 9)))
        name = f"mix_{i:03d}"
        write_flac(out_dir / f"{name}.flac", audio)
        write_rttm(out_dir / f"{name}.rttm", name, segments)
        used = sorted({s.speaker for s in segments})
        out.append(
            dict(
                file_name=f"{name}.flac",
                num_speakers=len(used),
                rttm_file=f"{name}.rttm",
                duration=round(len(audio) / dc.SAMPLING_RATE, 3),
                speakers=" ".join(used),
                overlap_ratio=round(dc.overlap_ratio(segments), 3),
                num_segments=len(segments),
                source_files=" ".join(f for s in chosen for f in files[s]),
            )
        )
    return out


def build_noise(rows: list[dict], corpus_dir: Path, out_dir: Path, seconds: float, seed: int) -> list[dict]:
    """Coloured noise and babble (train speakers only), a separate set of files per split so
    evaluation can use noise that pretraining never saw. Stored at a low level: the level is
    irrelevant (mix_at_snr rescales) and quieter noise compresses better in FLAC."""
    rng = dc._rng(seed, "noise")
    n = int(seconds * dc.SAMPLING_RATE)
    train = [r for r in rows if r["split"] == "train" and not r["pseudo_speaker"]]
    out = []
    for split in ("train", "test"):
        for colour in ("white", "pink", "brown"):
            name = f"{colour}_{split}.flac"
            write_flac(out_dir / name, 0.03 * augment.coloured_noise(n, colour, rng))
            out.append(
                dict(
                    file_name=name,
                    kind=colour,
                    split=split,
                    num_talkers=0,
                    source_speakers="",
                    duration=seconds,
                )
            )
        for talkers in (3, 6) if train else ():
            picks = [train[int(i)] for i in rng.choice(len(train), size=min(24, len(train)), replace=False)]
            utts = [load_audio(corpus_dir / r["file_name"]) for r in picks]
            name = f"babble{talkers}_{split}.flac"
            write_flac(out_dir / name, 0.03 * augment.make_babble(utts, n, talkers, rng))
            speakers = " ".join(sorted({r["speaker_id"] for r in picks}))
            out.append(
                dict(
                    file_name=name,
                    kind="babble",
                    split=split,
                    num_talkers=talkers,
                    source_speakers=speakers,
                    duration=seconds,
                )
            )
    return out


def distinctness(rows, trials, corpus_dir: Path, sentences, args) -> dict[str, float]:
    """MFCC-mean+std cosine EER on the test trials: as generated, and re-rendered without the
    random channel (same texts and prosody). Also on the English-only trials."""
    test_rows = [r for r in rows if r["split"] == "test"]
    english = {r["file_name"] for r in test_rows if r["language"] == "en"}
    en_trials = [t for t in trials if t["enroll_file"] in english and t["test_file"] in english]
    result = {}
    with_channel = {
        r["file_name"]: dc.mfcc_stats_embedding(load_audio(corpus_dir / r["file_name"])) for r in test_rows
    }
    plans = dc.plan_corpus(
        sentences,
        args.seed,
        [v for v in dc.TEST_SPEAKERS if not args.voices or v in args.voices],
        num_utterances=args.utterances_per_voice,
        english_fraction=args.english_fraction,
        channel=False,
    )
    plain_dir = corpus_dir.parent / ".no_channel"
    plain_rows, _ = dc.render_corpus(
        plans, plain_dir, sentences, args.processes, args.mbrola_dir, "test voices without channel"
    )
    no_channel = {
        r["file_name"]: dc.mfcc_stats_embedding(load_audio(plain_dir / r["file_name"])) for r in plain_rows
    }
    shutil.rmtree(plain_dir)
    for label, emb in (("no_channel", no_channel), ("channel", with_channel)):
        result[f"eer_{label}"] = dc.cosine_trials_eer(emb, trials)
        if en_trials and len({t["target"] for t in en_trials}) == 2:
            result[f"eer_{label}_english"] = dc.cosine_trials_eer(emb, en_trials)
    result["num_trials"] = len(trials)
    result["num_english_trials"] = len(en_trials)
    result.update(closed_set_id(rows, corpus_dir))
    return result


def closed_set_id(rows, corpus_dir: Path) -> dict[str, float]:
    """Counter-check that the channel leaves speaker identity in place: a logistic regression
    on the same MFCC statistics, trained on each real voice's even-numbered utterances and
    tested on the odd ones (all voices, both splits; closed set)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    real = [r for r in rows if not r["pseudo_speaker"]]
    feats = np.stack([dc.mfcc_stats_embedding(load_audio(corpus_dir / r["file_name"])) for r in real])
    labels = np.array([r["speaker_id"] for r in real])
    even = np.array([int(Path(r["file_name"]).stem.rsplit("_", 1)[1]) % 2 == 0 for r in real])
    if len(set(labels)) < 2:
        return {}
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(feats[even], labels[even])
    accuracy = float((clf.predict(feats[~even]) == labels[~even]).mean())
    return {"closed_set_id_accuracy": accuracy, "closed_set_speakers": len(set(labels))}


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def write_card(path: Path, rows, trials, mixtures, noise, renames, stats: dict) -> None:
    """The data card: what the corpus is, its licence, how it was made, and measured numbers."""
    real = [r for r in rows if not r["pseudo_speaker"]]
    lines = []

    def split_summary(split: str) -> str:
        rs = [r for r in rows if r["split"] == split]
        spk = {r["speaker_id"]: r for r in rs}
        real_spk = [r for r in spk.values() if not r["pseudo_speaker"]]
        f = sum(r["gender"] == "female" for r in real_spk)
        langs = sorted({r["language"] for r in rs})
        pseudo = len(spk) - len(real_spk)
        dur = sum(r["duration"] for r in rs) / 60
        return (
            f"| {split} | {len(real_spk)} ({f} F / {len(real_spk) - f} M) | {pseudo} | {len(rs)} | "
            f"{dur:.1f} | {len(langs)}: {' '.join(langs)} |"
        )

    durations = np.array([r["duration"] for r in rows])
    voice_table = []
    for v in dc.VOICES:
        vr = [r for r in real if r["voice"] == v.voice]
        if not vr:
            continue
        gaps = sum(r["diphone_gaps"] for r in vr) / max(sum(r["duration"] for r in vr), 1e-9)
        fixes = "; ".join(
            f"{ev}: " + " ".join(f"{a}→{b}" for a, b in m[0].items())
            for (vv, ev), m in sorted(renames.items())
            if vv == v.voice and m[0]
        )
        voice_table.append(
            f"| {v.voice} | {vr[0]['split']} | {v.gender} | {v.voice_language} | "
            f"{' '.join(sorted({r['language'] for r in vr}))} | {len(vr)} | {gaps:.2f} | {fixes or '-'} |"
        )
    eer = stats.get("distinctness")
    eer_text = (
        "| | all test trials | English-only trials |\n|---|---|---|\n"
        f"| no channel randomisation | {100 * eer['eer_no_channel']:.1f}% | "
        f"{100 * eer.get('eer_no_channel_english', float('nan')):.1f}% |\n"
        f"| with per-utterance channel (shipped) | {100 * eer['eer_channel']:.1f}% | "
        f"{100 * eer.get('eer_channel_english', float('nan')):.1f}% |\n\n"
        f"({eer['num_trials']} trials, {eer['num_english_trials']} English-only.) The EER near chance with the "
        "channel does not mean the identity is gone: a logistic regression on the same MFCC statistics, "
        "trained on the even-numbered utterances of each real voice and tested on the odd ones, "
        f"identifies the speaker among {eer.get('closed_set_speakers', 0)} with "
        f"{100 * eer.get('closed_set_id_accuracy', float('nan')):.1f}% accuracy "
        f"(chance {100 / max(eer.get('closed_set_speakers', 1), 1):.1f}%)."
        if eer
        else "Not measured in this run (use `--measure_distinctness`)."
    )
    lines += [
        "# delulu-hf demo corpus (MBROLA voices)",
        "",
        "Multi-speaker speech generated offline from real people's diphone recordings (MBROLA",
        "databases: one recorded person per voice), with espeak-ng as the text front end, so that",
        "every stage of delulu-hf (teacher, k-means labels, pretraining, evaluation) runs on a fresh",
        "machine without downloads. This card covers `data/demo_corpus/` (utterances and",
        "verification trials), `data/demo_mixtures/` (multi-speaker conversations with RTTM) and",
        "`data/demo_noise/` (coloured noise and babble). Generated by `training/make_demo_corpus.py`.",
        "",
        "**Synthetic speech is far easier than real speech**: treat numbers measured on this corpus",
        "as relative comparisons (model A vs. model B, clean vs. noisy), never as field EERs.",
        "",
        "## Licence",
        "",
        "- Audio: derived from the MBROLA voice databases, which are free for **non-commercial use",
        '  only**; a voice "may not be sold or incorporated into any product which is sold". The',
        "  audio therefore carries the same restriction. The corpus lives in the repository but is",
        "  not part of the Python wheel.",
        "- Sentences (`training/demo_sentences.json`), metadata, trials, RTTMs and generated noise:",
        "  written by the delulu-hf project, Apache-2.0.",
        "",
        "## Contents",
        "",
        "| split | real speakers | pseudo-speakers | utterances | minutes | text languages |",
        "|---|---|---|---|---|---|",
        split_summary("train"),
        split_summary("test"),
        "",
        f"- Utterances: {len(rows)}, {durations.sum() / 60:.1f} min, {durations.min():.2f}-"
        f"{durations.max():.2f} s (mean {durations.mean():.2f} s); FLAC 16 kHz mono 16-bit.",
        f"- `trials.csv`: {len(trials)} verification trials over the test speakers "
        f"({sum(t['target'] for t in trials)} target: every same-speaker pair; one random non-target "
        "per target, same enrolment file). Paths relative to this folder.",
        f"- `data/demo_mixtures/`: {len(mixtures)} conversations of "
        f"{'/'.join(str(k) for k in sorted({m['num_speakers'] for m in mixtures}))} test speakers, "
        f"{sum(m['duration'] for m in mixtures) / 60:.1f} min, mean overlap ratio "
        f"{np.mean([m['overlap_ratio'] for m in mixtures]) if mixtures else 0:.2f}; one RTTM per file "
        "(segments from an energy VAD of each turn).",
        f"- `data/demo_noise/`: {len(noise)} files ({', '.join(sorted({n['kind'] for n in noise}))}), one set "
        "per split; babble uses train speakers only.",
        f"- Sizes: demo_corpus {stats['mb_corpus']:.1f} MB, demo_mixtures {stats['mb_mixtures']:.1f} MB, "
        f"demo_noise {stats['mb_noise']:.1f} MB; total {stats['mb_corpus'] + stats['mb_mixtures'] + stats['mb_noise']:.1f} MB.",
        f"- Generation time: {stats['seconds']:.0f} s wall on {stats['processes']} processes "
        f"({os.cpu_count()} CPUs).",
        "",
        "### metadata.csv columns",
        "",
        "`file_name, speaker_id, gender, language` (language of the text), `text, split` (train/test),",
        "`voice` (MBROLA database), `voice_language` (the recorded person's language), `pseudo_speaker`",
        "(True for formant-shifted training-only pseudo-speakers, id `<voice>_fs<ratio%>`), `duration` (s),",
        "`diphone_gaps` (missing diphones mbrola replaced by silence), `espeak_voice, rate_wpm, pitch,",
        "pitch_ratio, formant_ratio` (synthesis settings), `channel` (the random channel applied).",
        "",
        'Load it with `delulu_hf.audio.load_audio_dataset("data/demo_corpus", split="train")` (the',
        "`split` column is used as the split).",
        "",
        "## How it is made",
        "",
        "1. Text: short neutral sentences written for this project, per language. Voices with an",
        "   English route (their own `mb-XX-en`, or one of a database with the same phoneme table)",
        f"   speak English in {stats['english_fraction']:.0%} of their utterances and their own language",
        "   otherwise, so that language is not a perfect proxy for the speaker.",
        "2. `espeak-ng -v mb-XX -q --pho -s RATE -p PITCH --stdin` → `.pho` (rate 125-165 wpm and",
        "   pitch 35-65 vary per utterance). Phonemes espeak-ng 1.51 emits but a database lacks are",
        "   renamed to stand-ins found by a calibration run (table below), instead of being filled",
        "   with silence.",
        "3. `mbrola -e [-f pitch_ratio] [-l formant_rate] DB - raw.wav`.",
        "4. `sox -D -R raw.wav -C 8 -b 16 -c 1 out.flac rate -h 16000 highpass H sinc -a 60 -L",
        "   equalizer … equalizer … gain -n P`: a random channel per utterance, low-pass 4-7.5 kHz,",
        "   high-pass 40-160 Hz, two ±6 dB peaking bands, peak level -9…-1 dBFS. The databases",
        "   differ in native bandwidth, which otherwise identifies the voice by itself.",
        "",
        "Test speakers (evaluation only; never used for the teacher, k-means or pretraining):",
        f"{', '.join(dc.TEST_SPEAKERS)}. They avoid the databases with many missing diphones.",
        "",
        "## Speaker distinctness (measured)",
        "",
        "Cosine EER of a 40-dim MFCC mean+std vector on `trials.csv`, with and without the random",
        "channel (same texts and prosody). A higher EER with the channel means that the channel",
        "cues the plain MFCC statistic exploited are gone.",
        "",
        eer_text,
        "",
        "## Voices",
        "",
        "| voice | split | gender | speaker's language | text languages | utts | gaps/s | phoneme renames |",
        "|---|---|---|---|---|---|---|---|",
        *voice_table,
        "",
        "Known caveats: the Debian package describes hu1 as male, but the voice is female; cz1 is",
        "female but its espeak-ng voice sets no pitch (raised with `mbrola -f 1.8`). Voices marked",
        "degraded in `delulu_hf.demo_corpus.VOICES` still have missing diphones (silence gaps) and are",
        "kept in the train split only.",
        "",
        "## Regenerate",
        "",
        "Debian packages (see `python training/make_demo_corpus.py --help` for enabling contrib and",
        "non-free): `espeak-ng sox libsox-fmt-all mbrola` and `mbrola-<voice>` for the 58 voices.",
        "",
        "```",
        stats["command"],
        "```",
        "",
        "Output is deterministic for a given seed and these tool versions: " + stats["tool_versions"] + ".",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def tool_versions() -> str:
    import subprocess

    esp = (
        subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True)
        .stdout.split("Data")[0]
        .strip()
    )
    sox = subprocess.run(["sox", "--version"], capture_output=True, text=True).stdout.strip()
    return f"{esp}; {sox}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = dc.missing_tools()
    if missing:
        raise UserError(
            f"missing programs: {', '.join(missing)}; install the Debian packages "
            f"{' '.join(dc.DEBIAN_PACKAGES)} and the mbrola-XX voices (see --help)"
        )
    wanted = args.voices or [v.voice for v in dc.VOICES]
    absent = [v for v in wanted if not os.path.exists(dc.database_path(v, args.mbrola_dir))]
    if absent:
        raise UserError(f"missing MBROLA voices: {' '.join(absent)} (apt-get install mbrola-<voice>)")
    sentences = json.loads(args.sentences.read_text(encoding="utf-8"))
    start = time.time()

    final = {k: args.data_dir / k for k in ("demo_corpus", "demo_mixtures", "demo_noise")}
    staging_root = args.data_dir / ".demo_build"
    shutil.rmtree(staging_root, ignore_errors=True)
    stage = {k: staging_root / k for k in final}
    for d in stage.values():
        d.mkdir(parents=True)

    plans = dc.plan_corpus(
        sentences,
        args.seed,
        args.voices,
        num_utterances=args.utterances_per_voice,
        english_fraction=args.english_fraction,
        pseudo_per_voice=args.pseudo_per_voice,
        pseudo_utterances=args.pseudo_utterances,
        channel=not args.no_channel,
    )
    rows, renames = dc.render_corpus(
        plans, stage["demo_corpus"], sentences, args.processes, args.mbrola_dir, "utterances"
    )
    trials = dc.make_trials(rows, args.seed)
    dc.write_csv_atomic(stage["demo_corpus"] / "trials.csv", trials, ["enroll_file", "test_file", "target"])
    mixtures = build_mixtures(
        rows, stage["demo_corpus"], stage["demo_mixtures"], args.num_mixtures, args.seed
    )
    dc.write_csv_atomic(stage["demo_mixtures"] / "metadata.csv", mixtures, MIXTURE_COLUMNS)
    noise = (
        build_noise(rows, stage["demo_corpus"], stage["demo_noise"], args.noise_seconds, args.seed)
        if args.noise_seconds > 0
        else []
    )
    dc.write_csv_atomic(stage["demo_noise"] / "metadata.csv", noise, NOISE_COLUMNS)
    # metadata.csv last: its presence means the audio is complete.
    dc.write_csv_atomic(stage["demo_corpus"] / "metadata.csv", rows, CORPUS_COLUMNS)
    seconds = time.time() - start

    stats = dict(
        seconds=seconds,
        processes=args.processes,
        english_fraction=args.english_fraction,
        mb_corpus=folder_mb(stage["demo_corpus"]),
        mb_mixtures=folder_mb(stage["demo_mixtures"]),
        mb_noise=folder_mb(stage["demo_noise"]),
        command="python training/make_demo_corpus.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        tool_versions=tool_versions(),
    )
    if args.measure_distinctness:
        stats["distinctness"] = distinctness(rows, trials, stage["demo_corpus"], sentences, args)
        print(json.dumps(stats["distinctness"], indent=1))
    if not args.no_card:
        write_card(stage["demo_corpus"] / "README.md", rows, trials, mixtures, noise, renames, stats)

    for key, target in final.items():
        if not (stage[key] / "metadata.csv").exists():
            continue
        replace_dir(stage[key], target)
    shutil.rmtree(staging_root, ignore_errors=True)
    print(
        f"wrote {len(rows)} utterances ({sum(r['duration'] for r in rows) / 60:.1f} min), {len(trials)} trials, "
        f"{len(mixtures)} mixtures, {len(noise)} noise files in {seconds:.0f} s; sizes (MB): corpus "
        f"{stats['mb_corpus']:.1f}, mixtures {stats['mb_mixtures']:.1f}, noise {stats['mb_noise']:.1f}"
    )
    return 0


if __name__ == "__main__":
    main_entry(main)
