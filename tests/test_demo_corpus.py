"""delulu_hf.demo_corpus helpers, the committed demo data, and the generator's determinism."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from audio_fixtures import synthetic_voice, tone

from delulu_hf import augment
from delulu_hf import demo_corpus as dc
from delulu_hf import segments as S

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
CORPUS, MIXTURES, NOISE = DATA / "demo_corpus", DATA / "demo_mixtures", DATA / "demo_noise"


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- signal helpers


def bursts(seconds_on: float = 0.5, seconds_off: float = 1.0, n: int = 3, sr: int = 16000) -> np.ndarray:
    """Tone bursts separated by digital silence (MBROLA output has such pauses)."""
    on = [tone(seconds_on, sr, freq=200.0 + 100 * i, amplitude=0.3) for i in range(n)]
    off = np.zeros(int(seconds_off * sr), dtype=np.float32)
    return np.concatenate([x for b in on for x in (off, b)] + [off])


def test_active_speech_mask_and_segments_find_the_bursts():
    x = bursts()
    segments = augment.speech_segments(x)
    assert len(segments) == 3
    for i, (start, end) in enumerate(segments):
        true_start = 1.0 + i * 1.5
        assert abs(start - true_start) < 0.02 and abs(end - (true_start + 0.5)) < 0.02
    assert augment.active_speech_mask(x).mean() == pytest.approx(1.5 / 5.5, abs=0.015)
    assert augment.active_rms(np.zeros(1000, dtype=np.float32)) == 0.0


@pytest.mark.parametrize("colour,slope", [("white", 0.0), ("pink", -1.0), ("brown", -2.0)])
def test_coloured_noise_spectral_slope_and_level(colour, slope):
    noise = augment.coloured_noise(2**16, colour, np.random.default_rng(0))
    assert noise.dtype == np.float32 and np.sqrt(np.mean(noise**2)) == pytest.approx(1.0, rel=1e-4)
    power = np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.arange(len(power))
    band = (freqs > 50) & (freqs < 20000)
    fitted = np.polyfit(np.log(freqs[band]), np.log(power[band]), 1)[0]
    assert fitted == pytest.approx(slope, abs=0.1)
    again = augment.coloured_noise(2**16, colour, np.random.default_rng(0))
    np.testing.assert_array_equal(noise, again)


@pytest.mark.parametrize("snr_db", [0.0, 15.0, 25.0])
def test_mix_at_snr_is_measured_on_active_speech(snr_db):
    clean = bursts()
    noise = augment.coloured_noise(30000, "pink", np.random.default_rng(0))  # shorter: gets tiled
    mixture, scaled = augment.mix_at_snr(
        clean, noise, snr_db, rng=np.random.default_rng(0), return_noise=True
    )
    np.testing.assert_allclose(mixture, clean + scaled, atol=1e-7)
    mask = augment.active_speech_mask(clean)
    measured = 10 * np.log10(np.mean(clean[mask] ** 2) / np.mean(scaled**2))
    assert measured == pytest.approx(snr_db, abs=0.01)
    # Whole-signal SNR is lower, since two thirds of `clean` is silence.
    assert 10 * np.log10(np.mean(clean**2) / np.mean(scaled**2)) < snr_db - 3


def test_mix_at_snr_accepts_torch_and_silence():
    clean = torch.from_numpy(bursts())
    out = augment.mix_at_snr(clean, torch.randn(5000), 10.0, rng=np.random.default_rng(0))
    assert isinstance(out, torch.Tensor) and out.shape == clean.shape and out.dtype == torch.float32
    silent = np.zeros(1000, dtype=np.float32)
    np.testing.assert_array_equal(augment.mix_at_snr(silent, np.ones(1000), 5.0), silent)


def test_babble_is_unit_rms_and_deterministic():
    rng = np.random.default_rng(0)
    utts = [synthetic_voice(i, 0.7, rng) for i in range(5)]
    a = augment.make_babble(utts, 20000, 3, np.random.default_rng(3))
    b = augment.make_babble(utts, 20000, 3, np.random.default_rng(3))
    assert a.shape == (20000,) and np.sqrt(np.mean(a**2)) == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_array_equal(a, b)


def test_conversation_segments_rttm_roundtrip_and_overlap(tmp_path):
    rng = np.random.default_rng(0)
    utts = {f"s{i}": [synthetic_voice(i, 1.2, rng) for _ in range(3)] for i in range(3)}
    audio, segments = dc.build_conversation(utts, np.random.default_rng(5), target_seconds=5.0)
    again, same = dc.build_conversation(utts, np.random.default_rng(5), target_seconds=5.0)
    np.testing.assert_array_equal(audio, again)
    assert segments == same
    assert {s.speaker for s in segments} == set(utts)
    assert all(0 <= s.start < s.end <= len(audio) / 16000 + 1e-6 for s in segments)
    assert len(audio) / 16000 >= 5.0 and np.abs(audio).max() <= 0.95 + 1e-6
    S.write_rttm(tmp_path / "c.rttm", "conv", segments)
    parsed = S.read_rttm(tmp_path / "c.rttm")["conv"]
    assert [s.speaker for s in parsed] == [s.speaker for s in segments]
    assert all(abs(a.start - b.start) < 1e-3 and abs(a.end - b.end) < 2e-3 for a, b in zip(parsed, segments))
    known = [S.Segment(0.0, 2.0, "a"), S.Segment(1.0, 3.0, "b")]
    assert dc.overlap_ratio(known) == pytest.approx(1.0 / 3.0, abs=0.01)


def test_trials_cover_every_same_speaker_pair():
    rows = [
        {"file_name": f"{s}_{i}.flac", "speaker_id": s, "split": "test"}
        for s in ("a", "b", "c")
        for i in range(4)
    ] + [{"file_name": "t.flac", "speaker_id": "t", "split": "train"}]
    trials = dc.make_trials(rows, seed=0)
    targets = [t for t in trials if t["target"] == 1]
    assert len(targets) == 3 * 6 and len(trials) == 2 * len(targets)
    for t in trials:
        same = t["enroll_file"].split("_")[0] == t["test_file"].split("_")[0]
        assert same == bool(t["target"]) and "t.flac" not in (t["enroll_file"], t["test_file"])
    assert trials == dc.make_trials(rows, seed=0)


# ---------------------------------------------------------------- planning (no tools needed)


def sentences() -> dict:
    return json.loads((REPO / "training" / "demo_sentences.json").read_text(encoding="utf-8"))


def test_voice_table_and_sentence_lists():
    assert len(dc.VOICES) == 58 and len(dc.VOICES_BY_ID) == 58
    issue_voices = (
        "ar1 ar2 br1 br2 br4 ca1 ca2 cr1 cz1 cz2 de1 de2 de3 de4 de6 de7 de8 ee1 en1 es1 es2 es3 fr1 fr2 fr3 "
        "fr5 fr6 fr7 gr1 gr2 hb1 hb2 hu1 ic1 id1 in1 in2 ir1 it1 it2 jp1 jp2 jp3 la1 lt1 ma1 mx1 mx2 nl2 nl3 "
        "nz1 pl1 sw1 tl1 tr1 us1 us2 vz1"
    ).split()
    assert sorted(dc.VOICES_BY_ID) == sorted(issue_voices)
    assert dc.VOICES_BY_ID["hu1"].gender == "female" and dc.VOICES_BY_ID["cz1"].pitch_ratio > 1.5
    texts = sentences()
    for voice in dc.VOICES:
        assert len(set(texts[voice.language])) >= 12, voice.voice
    for lang, items in texts.items():
        if not lang.startswith("_"):
            assert len(set(items)) == len(items), lang
            assert all(not s.startswith("-") and 0 < len(s) < 90 for s in items), lang


def test_plan_is_deterministic_and_independent_of_the_voice_subset():
    full = dc.plan_corpus(sentences(), seed=3, num_utterances=4, pseudo_per_voice=1, pseudo_utterances=2)
    sub = dc.plan_corpus(sentences(), seed=3, voices=["de4", "us2"], num_utterances=4, pseudo_per_voice=1)
    by_name = {p.file_name: p for p in full}
    assert all(by_name[p.file_name] == p for p in sub if not p.pseudo_speaker)
    assert all(p.split == "train" for p in full if p.pseudo_speaker)
    other_seed = dc.plan_corpus(sentences(), seed=4, voices=["de4"], num_utterances=4, pseudo_per_voice=0)
    assert [p.text for p in other_seed] != [by_name[p.file_name].text for p in other_seed]
    de4 = [p for p in full if p.speaker_id == "de4"]
    assert {p.language for p in de4} == {"en", "de"}  # bilingual voices speak both


# ---------------------------------------------------------------- the committed data


@pytest.fixture(scope="module")
def corpus_rows():
    if not (CORPUS / "metadata.csv").exists():
        pytest.fail("data/demo_corpus/metadata.csv is missing: run training/make_demo_corpus.py")
    return read_csv(CORPUS / "metadata.csv")


def test_committed_corpus_files_and_metadata(corpus_rows):
    columns = set(corpus_rows[0])
    assert {"file_name", "speaker_id", "gender", "language", "text", "split"} <= columns
    names = [r["file_name"] for r in corpus_rows]
    assert len(names) == len(set(names))
    for r in corpus_rows:
        info = sf.info(CORPUS / r["file_name"])
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC"), r["file_name"]
        assert abs(info.frames / 16000 - float(r["duration"])) < 1e-3
        assert r["split"] in ("train", "test") and r["gender"] in ("female", "male") and r["text"]
    on_disk = {p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*.flac")}
    assert on_disk == set(names)


def test_committed_corpus_split_is_speaker_disjoint_and_balanced(corpus_rows):
    speakers = defaultdict(set)
    for r in corpus_rows:
        speakers[r["split"]].add(r["speaker_id"])
        if r["pseudo_speaker"] == "True":
            assert r["split"] == "train" and r["voice"] not in dc.TEST_SPEAKERS
    assert not speakers["train"] & speakers["test"]
    assert speakers["test"] == set(dc.TEST_SPEAKERS)
    assert {r["voice"] for r in corpus_rows} == set(dc.VOICES_BY_ID)
    for split in ("train", "test"):
        rows = [r for r in corpus_rows if r["split"] == split]
        assert {r["gender"] for r in rows} == {"female", "male"}
        assert len({r["language"] for r in rows}) >= 5
        assert any(r["language"] == "en" for r in rows)
    minutes = sum(float(r["duration"]) for r in corpus_rows) / 60
    assert 25 <= minutes <= 40


def test_committed_trials_reference_test_files(corpus_rows):
    split = {r["file_name"]: r for r in corpus_rows}
    trials = read_csv(CORPUS / "trials.csv")
    assert list(trials[0]) == ["enroll_file", "test_file", "target"]
    assert {t["target"] for t in trials} == {"0", "1"}
    for t in trials:
        a, b = split[t["enroll_file"]], split[t["test_file"]]
        assert a["split"] == b["split"] == "test"
        assert (a["speaker_id"] == b["speaker_id"]) == (t["target"] == "1")


def test_committed_mixtures_match_their_rttms(corpus_rows):
    test_speakers = {r["speaker_id"] for r in corpus_rows if r["split"] == "test"}
    rows = read_csv(MIXTURES / "metadata.csv")
    assert len(rows) >= 24 and {int(r["num_speakers"]) for r in rows} == {2, 3, 4}
    for r in rows:
        info = sf.info(MIXTURES / r["file_name"])
        assert (info.samplerate, info.channels) == (16000, 1)
        rttm = S.read_rttm(MIXTURES / r["rttm_file"])
        (file_id, segments), *rest = rttm.items()
        assert not rest and file_id == Path(r["file_name"]).stem
        speakers = {s.speaker for s in segments}
        assert len(speakers) == int(r["num_speakers"]) and speakers <= test_speakers
        assert max(s.end for s in segments) <= info.frames / 16000 + 1e-3
        assert all((CORPUS / f).exists() for f in r["source_files"].split())
    assert any(float(r["overlap_ratio"]) > 0 for r in rows)


def test_committed_noise_and_total_size(corpus_rows):
    train_speakers = {r["speaker_id"] for r in corpus_rows if r["split"] == "train"}
    rows = read_csv(NOISE / "metadata.csv")
    assert {r["kind"] for r in rows} == {"white", "pink", "brown", "babble"}
    for r in rows:
        assert sf.info(NOISE / r["file_name"]).samplerate == 16000
        if r["kind"] == "babble":
            assert set(r["source_speakers"].split()) <= train_speakers
    total = sum(p.stat().st_size for d in (CORPUS, MIXTURES, NOISE) for p in d.rglob("*") if p.is_file())
    assert total <= 40e6
    card = (CORPUS / "README.md").read_text(encoding="utf-8")
    assert "non-commercial" in card and "make_demo_corpus.py" in card


# ---------------------------------------------------------------- generator (needs the tools)


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_demo_corpus", REPO / "training" / "make_demo_corpus.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_generator_help_names_the_debian_packages(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _generator().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("espeak-ng", "mbrola", "sox", "contrib", "non-free", "non-commercial"):
        assert word in text


def test_generator_flags_old_spellings_and_typos(tmp_path, capsys):
    gen = _generator()
    args = gen.parse_args(["--voices", "us2", "hb1", "--data_dir", str(tmp_path), "--no_card"])
    assert (args.voices, args.data_dir, args.no_card, args.num_mixtures) == (
        ["us2", "hb1"],
        tmp_path,
        True,
        36,
    )
    # The old hyphenated spellings still work, with a deprecation warning.
    old = gen.parse_args(["--utterances-per-voice", "2", "--no-channel", "--data-dir", str(tmp_path)])
    assert (old.utterances_per_voice, old.no_channel, old.data_dir) == (2, True, tmp_path)
    assert "--no-channel is deprecated, use --no_channel" in capsys.readouterr().err
    for argv, message in (
        (["--voicez", "us2"], "did you mean --voices?"),
        (["--voices", "xx9"], "unknown voices"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            gen.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


needs_tools = pytest.mark.skipif(
    bool(dc.missing_tools()) or not all(os.path.exists(dc.database_path(v)) for v in ("us2", "hb1")),
    reason="espeak-ng, mbrola, sox or the mbrola-us2/mbrola-hb1 voices are not installed "
    "(Debian contrib/non-free; see training/make_demo_corpus.py --help)",
)


@needs_tools
def test_generator_is_deterministic_on_two_voices(tmp_path):
    gen = _generator()
    argv = ["--voices", "us2", "hb1", "--utterances_per_voice", "2", "--pseudo_per_voice", "1"]
    argv += ["--pseudo_utterances", "1", "--noise_seconds", "1", "--num_mixtures", "0", "--processes", "1"]
    outputs = []
    for run in ("a", "b"):
        assert gen.main([*argv, "--data_dir", str(tmp_path / run)]) == 0
        outputs.append(tmp_path / run / "demo_corpus")
    rows_a, rows_b = (read_csv(o / "metadata.csv") for o in outputs)
    assert rows_a == rows_b and len(rows_a) == 2 + 2 + 1  # us2 (test), hb1 (train) + 1 pseudo
    for r in rows_a:
        a, b = (sf.read(o / r["file_name"], dtype="int16")[0] for o in outputs)
        np.testing.assert_array_equal(a, b)
        assert (outputs[0] / r["file_name"]).read_bytes() == (outputs[1] / r["file_name"]).read_bytes()
    pseudo = [r for r in rows_a if r["pseudo_speaker"] == "True"]
    assert len(pseudo) == 1 and pseudo[0]["split"] == "train" and pseudo[0]["speaker_id"].startswith("hb1_fs")
    # The phoneme calibration removes the gaps espeak-ng's Hebrew '?' would leave in hb1.
    assert "?→_" in (outputs[0] / "README.md").read_text(encoding="utf-8")
    # Same seed, same plan as the committed corpus: texts and synthesis settings agree.
    committed = {r["file_name"]: r for r in read_csv(CORPUS / "metadata.csv")}
    for r in rows_a:
        if r["file_name"].startswith("audio/us2/"):
            keys = ("text", "rate_wpm", "pitch", "channel", "language")
            assert {k: r[k] for k in keys} == {k: committed[r["file_name"]][k] for k in keys}
    shutil.rmtree(tmp_path)
