"""The evaluation suite end to end on a tiny synthetic audiofolder, a tiny DELULU and the MFCC baseline."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from delulu_hf.evaluation import run_evaluation
from delulu_hf.evaluation.data import Corpus, Mixture, Mixtures, generate_trials, read_trials, speaker_split
from delulu_hf.evaluation.diarization import diarization, diarization_windows, estimate_num_speakers
from delulu_hf.evaluation.encoders import TeacherEncoder, TransformersEncoder, load_encoder
from delulu_hf.evaluation.features import AudioItem, FeatureSet, extract_features, length_batches

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
ALL_TASKS = [
    "verification",
    "verification_downstream",
    "identification",
    "profiling",
    "counting",
    "diarization",
]


# --------------------------------------------------------------------------------------------------
# Fixtures: a synthetic audiofolder (harmonic "voices" with a per-speaker pitch and timbre) + mixtures
# --------------------------------------------------------------------------------------------------


def _voice(rng: np.random.Generator, f0: float, seconds: float, brightness: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / SR
    x = sum(brightness**h * np.sin(h * phase) for h in range(1, 12))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 2.5 * t) ** 2) + 0.02 * rng.standard_normal(len(t))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    """8 speakers x 4 utterances (4 train, 4 test speakers), and 8 mixtures of 2-3 test speakers."""
    root = tmp_path_factory.mktemp("synthetic")
    corpus, mixtures = root / "corpus", root / "mixtures"
    rng = np.random.default_rng(0)
    rows, voices = [], []
    for s in range(8):
        split = "test" if s >= 4 else "train"
        voices.append((f"spk{s}", 90 + 25 * s, 0.5 + 0.04 * s, split))
        for u in range(4):
            name = f"spk{s}/utt{u}.flac"
            (corpus / name).parent.mkdir(parents=True, exist_ok=True)
            sf.write(corpus / name, _voice(rng, 90 + 25 * s, 1.0 + 0.25 * u, 0.5 + 0.04 * s), SR)
            gender, language = ("f" if s % 2 else "m"), ("en" if s % 4 < 2 else "de")
            rows.append(
                dict(
                    file_name=name,
                    speaker_id=f"spk{s}",
                    gender=gender,
                    language=language,
                    text="-",
                    split=split,
                )
            )
    _write_csv(corpus / "metadata.csv", rows)
    test_voices = [v for v in voices if v[3] == "test"]
    mixtures.mkdir()
    mix_rows = []
    for m in range(8):
        k = 2 + m % 2
        chosen = [test_voices[i] for i in rng.choice(len(test_voices), k, replace=False)]
        audio, lines, t = np.zeros(int(4.5 * SR), np.float32), [], 0.0
        for j, (name, f0, brightness, _) in enumerate(chosen * 2):
            seg = _voice(rng, f0, 1.0, brightness)
            audio[int(t * SR) : int(t * SR) + len(seg)] += seg
            lines.append(f"SPEAKER mix{m} 1 {t:.3f} 1.000 <NA> <NA> {name} <NA> <NA>")
            t += 1.0 - (0.2 if j == 1 else 0.0)  # one 0.2 s overlap per mixture
            if t + 1.0 > 4.5:
                break
        sf.write(mixtures / f"mix{m}.flac", audio, SR)
        (mixtures / f"mix{m}.rttm").write_text("\n".join(lines) + "\n")
        mix_rows.append(dict(file_name=f"mix{m}.flac", num_speakers=k, rttm_file=f"mix{m}.rttm"))
    _write_csv(mixtures / "metadata.csv", mix_rows)
    return corpus, mixtures


@pytest.fixture(scope="module")
def tiny_delulu(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer DELULU (hidden 32) saved like a real checkpoint."""
    from delulu_hf import DeluluConfig, DeluluModel

    config = DeluluConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        tdnn_dim=(16, 16, 16),
        tdnn_kernel=(3, 3, 1),
        tdnn_dilation=(1, 2, 1),
        xvector_output_dim=16,
        final_dim=16,
        num_clusters=8,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_delulu")
    DeluluModel(config).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# Data handling
# --------------------------------------------------------------------------------------------------


def test_length_batches_respect_budget_and_cover_every_item():
    lengths = [16000, 48000, 8000, 32000, 160000, 16000, 24000]
    batches = length_batches(lengths, batch_seconds=4.0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [4]  # the 10 s item exceeds the budget: alone, and first
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 4.0 * SR
        assert lengths[batch[0]] == longest  # sorted longest first


def test_generate_trials_all_targets_seeded_nontargets(synthetic):
    corpus = Corpus.load(synthetic[0])
    split = speaker_split(corpus)
    assert split.test == ["spk4", "spk5", "spk6", "spk7"] and split.source == "metadata split column"
    trials = generate_trials(corpus, split.test, seed=3, nontarget_ratio=2.0)
    speaker_of = corpus.speaker_of
    assert trials.n_target == 4 * 6  # C(4, 2) pairs per test speaker
    assert trials.n_nontarget == 48
    for a, b, y in zip(trials.enroll, trials.test, trials.target):
        assert speaker_of[a] in split.test and speaker_of[b] in split.test
        assert (speaker_of[a] == speaker_of[b]) == bool(y)
    assert len({(a, b) for a, b in zip(trials.enroll, trials.test)}) == len(trials)
    again = generate_trials(corpus, split.test, seed=3, nontarget_ratio=2.0)
    assert again.enroll == trials.enroll and again.test == trials.test


def test_seeded_speaker_split_without_split_column(tmp_path, synthetic):
    corpus = Corpus.load(synthetic[0])
    for row in corpus.rows:
        row.pop("split")
    split = speaker_split(corpus, seed=1, test_fraction=0.25)
    assert len(split.test) == 2 and not set(split.test) & set(split.train)
    assert len(split.train) + len(split.test) == 8


def test_bad_inputs_name_the_item(tmp_path, synthetic):
    corpus = Corpus.load(synthetic[0])
    bad = tmp_path / "trials.csv"
    bad.write_text("enroll_file,test_file,target\nspk4/utt0.flac,nope.flac,1\n")
    with pytest.raises(ValueError, match="nope.flac"):
        read_trials(bad, corpus)
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "metadata.csv").write_text("file_name,speaker_id\nmissing.flac,a\n")
    with pytest.raises(FileNotFoundError, match="missing.flac"):
        Corpus.load(folder)
    (folder / "metadata.csv").write_text("file_name\nmissing.flac\n")
    with pytest.raises(ValueError, match="speaker_id"):
        Corpus.load(folder)


def test_shipped_demo_data_has_the_expected_format():
    corpus_dir, mixtures_dir = ROOT / "data" / "demo_corpus", ROOT / "data" / "demo_mixtures"
    if not (corpus_dir / "metadata.csv").is_file() or not (mixtures_dir / "metadata.csv").is_file():
        pytest.skip("demo data not generated")
    corpus = Corpus.load(corpus_dir)
    trials = read_trials(corpus_dir / "trials.csv", corpus)
    split = speaker_split(corpus)
    speaker_of = corpus.speaker_of
    assert {speaker_of[f] for f in trials.files()} <= set(split.test)  # trials only use held-out speakers
    mixtures = Mixtures.load(mixtures_dir)
    assert all(m.reference for m in mixtures.entries)
    assert all(len({s for *_, s in m.reference}) == m.num_speakers for m in mixtures.entries)


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def test_features_are_cached_and_independent_of_batching(tmp_path, synthetic, tiny_delulu):
    corpus = Corpus.load(synthetic[0])
    items = corpus.items()[:6]
    encoder = load_encoder(str(tiny_delulu))
    assert isinstance(encoder, TransformersEncoder) and encoder.primary == "layer_2"
    first = extract_features(encoder, items, cache_dir=tmp_path, with_frames=True, progress=False)
    assert first.stats["cached"] is False and first.stats["audio_seconds_per_second"] > 0
    assert [p.name for p in tmp_path.iterdir()] == [
        Path(first.stats["cache_file"]).name
    ]  # no temp files left
    # A frames cache also serves a pooled-only request; nothing is re-extracted.
    second = extract_features(encoder, items, cache_dir=tmp_path, progress=False)
    assert second.stats["cached"] is True
    for stream in first.streams:
        np.testing.assert_array_equal(first.pooled[stream], second.pooled[stream])
    # Pooled = time-mean of the item's valid frames; frame counts follow the conv stack.
    for row, item in enumerate(items):
        frames = first.item_frames(row, "layer_2").astype(np.float32)
        assert len(frames) == int(encoder.model._get_feat_extract_output_lengths(item.num_samples))
        np.testing.assert_allclose(frames.mean(0), first.pooled["layer_2"][row], atol=2e-3)
    # The same model wrapped in memory gives the same features (and its own cache key).
    in_memory = TransformersEncoder.from_model(encoder.model, name="in-memory")
    wrapped = extract_features(in_memory, items[:2], cache_dir=tmp_path / "mem", progress=False)
    np.testing.assert_allclose(wrapped.pooled["layer_1"], first.pooled["layer_1"][:2], atol=1e-5)
    # One item at a time (no padding) gives the same features as length-bucketed padded batches.
    alone = extract_features(encoder, items, batch_seconds=0.1, progress=False)
    assert alone.stats["num_batches"] == len(items) and first.stats["num_batches"] < len(items)
    for stream in first.streams:
        np.testing.assert_allclose(alone.pooled[stream], first.pooled[stream], atol=1e-4)


def test_mfcc_features_do_not_depend_on_batch_mates(synthetic):
    items = Corpus.load(synthetic[0]).items()
    encoder = load_encoder("mfcc")
    batched = extract_features(encoder, items, progress=False)
    alone = extract_features(encoder, items, batch_seconds=0.1, progress=False)
    assert batched.stats["num_batches"] == 1 and alone.stats["num_batches"] == len(items)
    for stream in ("mfcc", "mfcc_mean_std"):
        np.testing.assert_allclose(batched.pooled[stream], alone.pooled[stream], rtol=1e-5, atol=1e-4)


def test_too_short_item_is_rejected_by_name(synthetic):
    encoder = load_encoder("mfcc")
    path = synthetic[0] / "spk0" / "utt0.flac"
    with pytest.raises(ValueError, match="tiny"):
        extract_features(encoder, [AudioItem("tiny", str(path), num_samples=10)], progress=False)


def test_teacher_encoder_gives_frames_and_embedding(tmp_path, synthetic):
    from delulu_hf.teacher.redimnet import ReDimNet

    torch.manual_seed(0)
    tiny = dict(F=12, C=4, group_divisor=1, embed_dim=16)
    stages = [(1, 1, 2, [(3, 3)], 4), (2, 1, 1, [(3, 3)], 4), (3, 1, 1, [(3, 3)], None)]
    ReDimNet.from_preset("b0", **tiny, stages_setup=stages).save_pretrained(tmp_path / "teacher")
    encoder = load_encoder(str(tmp_path / "teacher"))
    assert isinstance(encoder, TeacherEncoder)
    items = Corpus.load(synthetic[0]).items()[:3]
    features = extract_features(encoder, items, progress=False)
    assert features.streams == ["frames", "embedding"] and features.primary == "embedding"
    assert features.pooled["frames"].shape == (3, encoder.teacher.feature_dim)
    assert features.pooled["embedding"].shape[0] == 3 and np.isfinite(features.pooled["embedding"]).all()


# --------------------------------------------------------------------------------------------------
# Diarization logic on ideal embeddings
# --------------------------------------------------------------------------------------------------


def test_speaker_count_estimate_on_separated_clusters():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        centres = rng.normal(size=(k, 16)) * 3
        points = np.concatenate([c + 0.1 * rng.normal(size=(6, 16)) for c in centres])
        assert estimate_num_speakers(points) == k


def test_diarization_with_ideal_embeddings_only_errs_near_turns(synthetic, tmp_path):
    """Windows embedded by their majority reference speaker: errors can only come from window
    resolution around speaker changes and from overlap, so DER must be small and collar 0.5 lower."""
    mixtures = Mixtures.load(synthetic[1])
    windows = diarization_windows(mixtures, window_seconds=0.5, hop_seconds=0.25)
    reference = {m.key: m.reference for m in mixtures.entries}
    speakers = sorted({s for m in mixtures.entries for *_, s in m.reference})
    pooled = np.zeros((len(windows), len(speakers)), np.float32)
    for i, w in enumerate(windows):
        a = w.start_sample / SR
        b = a + w.seconds
        file = w.key.rsplit("@", 1)[0]
        talk = Counter()
        for s, e, spk in reference[file]:
            talk[spk] += max(0.0, min(b, e) - max(a, s))
        pooled[i, speakers.index(talk.most_common(1)[0][0])] = 1.0
    features = FeatureSet(
        keys=[w.key for w in windows],
        streams=["oracle"],
        frame_streams=[],
        primary="oracle",
        pooled={"oracle": pooled},
    )
    result = diarization(features, windows, mixtures, output_dir=tmp_path)
    assert result["n_files"] == 8
    assert result["der_known_collar_0"] < 0.15
    assert result["der_known_collar_0.5"] < result["der_known_collar_0"]
    seconds = result["seconds"]["known_collar_0"]
    # one 0.2 s overlap per mixture: the single-label hypothesis misses at least that much speech
    assert seconds["missed"] >= 8 * 0.2 - 1e-6 and seconds["false_alarm"] == 0.0
    assert len(list((tmp_path / "diarization_rttm").glob("*.rttm"))) == 8


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def _check_results_shape(results: dict, n_layers: int) -> None:
    tasks = results["tasks"]
    assert not [name for name, entry in tasks.items() if "error" in entry], tasks
    v = tasks["verification"]
    for key in ("eer", "min_dcf_0.01", "min_dcf_0.05", "n_target", "n_nontarget", "best_layer", "per_layer"):
        assert key in v
    assert 0.0 <= v["eer"] <= 1.0 and len(v["per_layer"]) == n_layers
    assert v["per_layer"][v["best_layer"]]["eer"] == min(e["eer"] for e in v["per_layer"])
    assert v["n_target"] == 24 and v["n_nontarget"] == 24
    identification = tasks["identification"]
    assert identification["n_speakers"] == 8 and identification["n_test"] == 8
    for attribute in ("gender", "language"):
        assert tasks["profiling"][attribute]["n_test_speakers"] == 4
        assert 0.0 <= tasks["profiling"][attribute]["knn_macro_f1"] <= 1.0
    assert {int(k) for k in tasks["counting"]["classes_test"]} == {1, 2, 3, 4}
    d = tasks["diarization"]
    assert d["n_files"] == 8 and d["overlap"] == "scored"
    for key in (
        "der_known_collar_0",
        "der_known_collar_0.5",
        "der_estimated_collar_0",
        "der_estimated_collar_0.5",
    ):
        assert 0.0 <= d[key] <= 1.5


def test_mfcc_baseline_runs_every_task_without_a_model(tmp_path, synthetic):
    corpus, mixtures = synthetic
    small_head = dict(
        tdnn_dim=(32, 32, 64), tdnn_kernel=(3, 3, 1), tdnn_dilation=(1, 2, 1), xvector_output_dim=32
    )
    results = run_evaluation(
        "mfcc",
        corpus,
        tmp_path,
        tasks=ALL_TASKS,
        mixtures=mixtures,
        downstream_epochs=2,
        downstream_head_overrides=small_head,
        progress=False,
    )
    _check_results_shape(results, n_layers=2)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["model"] == "mfcc" and on_disk["seed"] == 0
    assert on_disk["tasks"]["verification"]["eer"] == results["tasks"]["verification"]["eer"]
    # The synthetic speakers differ in pitch and timbre, which MFCC statistics capture.
    assert results["tasks"]["verification"]["eer"] < 0.25
    assert results["tasks"]["identification"]["accuracy"] > 0.5
    assert results["tasks"]["verification_downstream"]["head"] == "Wav2Vec2ForXVector"
    md = (tmp_path / "results.md").read_text()
    assert "| verification (zero-shot) | EER |" in md and "diarization" in md
    for png in ("det_verification.png", "downstream_loss.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # Single-speaker "conversations" were generated for counting from held-out speakers only.
    generated = Mixtures.load(tmp_path / "generated_mixtures")
    assert generated.counts == Counter({1: 4, 4: 4})
    held_out = {"spk4", "spk5", "spk6", "spk7"}
    assert all({s for *_, s in m.reference} <= held_out for m in generated.entries)


def test_tiny_delulu_runs_every_task_with_its_own_xvector_head(tmp_path, synthetic, tiny_delulu):
    corpus, mixtures = synthetic
    results = run_evaluation(
        str(tiny_delulu),
        corpus,
        tmp_path,
        tasks=ALL_TASKS,
        mixtures=mixtures,
        downstream_epochs=1,
        progress=False,
    )
    _check_results_shape(results, n_layers=3)
    downstream = results["tasks"]["verification_downstream"]
    assert downstream["head"] == "DeluluForXVector"
    assert downstream["n_train_speakers"] == 4 and downstream["n_trials_dropped_training_speaker"] == 0
    assert sum(downstream["layer_weights"].values()) == pytest.approx(1.0)
    assert results["extraction"]["corpus"]["audio_seconds"] == pytest.approx(8 * (1.0 + 1.25 + 1.5 + 1.75))


def _load_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "training" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_cli_writes_results(tmp_path, synthetic, capsys):
    cli = _load_cli()
    corpus, _ = synthetic
    trials = tmp_path / "trials.csv"
    trials.write_text(
        "enroll_file,test_file,target\nspk4/utt0.flac,spk4/utt1.flac,1\nspk4/utt0.flac,spk5/utt1.flac,0\n"
    )
    out = tmp_path / "out"
    code = cli.main(
        ["--model", "mfcc", "--data", str(corpus), "--trials", str(trials), "--tasks", "verification",
         "--output", str(out), "--device", "cpu", "--no_progress"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["verification"]["n_target"] == 1
    assert results["tasks"]["verification"]["trials"] == str(trials)
    assert results["command"].startswith("evaluate.py --model mfcc")
    # a task the data cannot support fails loudly, without hiding the others
    code = cli.main(
        ["--model", "mfcc", "--data", str(corpus), "--tasks", "counting", "--mixtures-per-count", "2",
         "--output", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0  # counting falls back to mixtures generated from held-out speakers
    assert json.loads((out / "results.json").read_text())["tasks"]["counting"]["n_test"] > 0
    # the hyphenated spellings of earlier versions still work, with a deprecation warning
    err = capsys.readouterr().err
    assert "--mixtures-per-count is deprecated, use --mixtures_per_count" in err
    assert "--no-progress is deprecated, use --no_progress" in err
    counting = json.loads((out / "results.json").read_text())["tasks"]["counting"]
    assert counting["n_train"] + counting["n_test"] == 2 * 4  # --mixtures-per-count 2, counts 1-4


def test_cli_missing_data_exits_2_before_creating_output(tmp_path):
    """``--data`` that does not exist: one line on stderr, exit code 2, no output folder, no model load."""
    out = tmp_path / "O"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "training" / "evaluate.py"), "--model", "X", "--data", "no_such_dir",
         "--output", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["evaluate.py: error: --data no_such_dir: no such folder"]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--trials", "missing.csv", "--trials missing.csv: no such file"),
        ("--mixtures", "missing_mixtures", "--mixtures missing_mixtures: no such folder"),
        ("--model", "./missing_model", "--model ./missing_model: no such file or folder"),
        ("--model", "runs/missing/model", "--model runs/missing/model: no such file or folder"),
        ("--model", "missing.pt", "--model missing.pt: no such file or folder"),
    ],
)
def test_cli_checks_paths_before_loading_anything(tmp_path, synthetic, monkeypatch, flag, value, message):
    from delulu_hf.errors import UserError

    cli = _load_cli()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "run_evaluation", lambda **_: pytest.fail("run_evaluation must not be reached"))
    args = {"--model": "mfcc", "--data": str(synthetic[0]), "--output": "O", flag: value}
    with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
        cli.main([token for pair in args.items() for token in pair])
    assert not os.path.exists(tmp_path / "O")


def test_cli_tells_hub_ids_from_local_paths():
    cli = _load_cli()
    for hub in ("mfcc", "MFCC", "microsoft/wavlm-base-plus", "gpt2"):
        assert not cli._looks_local(hub), hub
    for local in ("./x", "/abs/model", "runs/a/b", "teacher.pt", "..", str(ROOT)):
        assert cli._looks_local(local), local


def test_mixtures_reject_bad_rows(tmp_path):
    (tmp_path / "a.flac").write_bytes(b"")
    (tmp_path / "metadata.csv").write_text("file_name,num_speakers\na.flac,two\n")
    with pytest.raises(ValueError, match="a.flac"):
        Mixtures.load(tmp_path)
    with pytest.raises(ValueError, match="appears in both"):
        _ = Mixtures([Mixture("x", tmp_path / "a.flac", 1)], "one") + Mixtures(
            [Mixture("x", tmp_path, 1)], "two"
        )


# --------------------------------------------------------------------------------------------------
# Progress and step logs (issue 14): integer units, never past the total, a line per step
# --------------------------------------------------------------------------------------------------


class _RecordingBar:
    """Stands in for tqdm: records every position and the total it was given."""

    bars: list[_RecordingBar] = []

    def __init__(self, iterable=None, total=None, disable=False, **kwargs):
        self.iterable, self.total, self.n, self.kwargs = iterable, total, 0, kwargs
        self.positions: list = []
        _RecordingBar.bars.append(self)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self.n += n
        self.positions.append(self.n)

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def test_progress_bars_count_whole_units_and_never_pass_their_total(tmp_path, synthetic, monkeypatch):
    import delulu_hf.evaluation.diarization as diarization_module
    import delulu_hf.evaluation.features as features_module
    import delulu_hf.evaluation.probes as probes_module
    import delulu_hf.evaluation.verification as verification_module

    for module in (features_module, probes_module, verification_module, diarization_module):
        monkeypatch.setattr(module, "tqdm", _RecordingBar)
    _RecordingBar.bars = []
    # Lengths that are not whole seconds or tenths: a float running total would drift.
    path = str(synthetic[0] / "spk0" / "utt3.flac")
    items = [AudioItem(f"i{n}", path, num_samples=16000 + 1601 * n + 7) for n in range(9)]
    extract_features(load_encoder("mfcc"), items, batch_seconds=2.0)
    (bar,) = _RecordingBar.bars
    assert bar.kwargs["unit"] == "s" and isinstance(bar.total, int)
    assert all(isinstance(n, int) and 0 <= n <= bar.total for n in bar.positions)
    assert bar.positions[-1] == bar.total == round(sum(it.num_samples for it in items) / SR)
    # Every task has a bar whose total is what it counts (layers, steps, mixtures).
    _RecordingBar.bars = []
    corpus, mixtures = synthetic
    run_evaluation(
        "mfcc", corpus, tmp_path, tasks=ALL_TASKS, mixtures=mixtures, downstream_epochs=1,
        downstream_head_overrides=dict(tdnn_dim=(8, 8, 8), tdnn_kernel=(3, 3, 1), tdnn_dilation=(1, 2, 1),
                                       xvector_output_dim=8),
    )  # fmt: skip
    descriptions = {b.kwargs.get("desc") for b in _RecordingBar.bars}
    for name in (
        "verification",
        "x-vector head",
        "identification",
        "profiling: gender",
        "counting",
        "diarization",
    ):
        assert name in descriptions, (name, descriptions)
    for b in _RecordingBar.bars:
        total = b.total if b.total is not None else len(b.iterable)
        assert all(isinstance(n, int) and n <= total for n in b.positions), b.kwargs


def test_each_step_logs_its_start_and_wall_time(tmp_path, synthetic, caplog):
    caplog.set_level("INFO", logger="delulu_hf.evaluation.suite")
    results = run_evaluation(
        "mfcc", synthetic[0], tmp_path, tasks=["verification", "identification"], progress=False
    )
    messages = [r.getMessage() for r in caplog.records if r.name == "delulu_hf.evaluation.suite"]
    for step in ("features: corpus", "task verification", "task identification"):
        assert f"{step}: started" in messages
        assert any(re.fullmatch(rf"{re.escape(step)}: done in \d+\.\d s", m) for m in messages), messages
        assert results["wall_seconds"][step] >= 0
    assert any(m.startswith("evaluation done in") for m in messages)
    assert json.loads((tmp_path / "results.json").read_text())["wall_seconds"]["total"] >= 0


# --------------------------------------------------------------------------------------------------
# A --model that is not a model: one line, before anything is loaded or created (issue 14)
# --------------------------------------------------------------------------------------------------


def _not_a_model(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "empty":
        return folder
    if kind == "run_folder":  # pretrain.py's output folder instead of its final/ model
        (folder / "final").mkdir()
        (folder / "final" / "config.json").write_text("{}")
    elif kind == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif kind == "no_model_type":
        (folder / "config.json").write_text('{"hidden_size": 4}')
    elif kind == "unknown_type":
        (folder / "config.json").write_text('{"model_type": "not-a-model"}')
    elif kind == "no_weights":
        (folder / "config.json").write_text('{"model_type": "delulu"}')
    elif kind == "text_file":
        folder = tmp_path / "model.txt"
        folder.write_text("x")
    return folder


@pytest.mark.parametrize(
    "kind,message",
    [
        ("empty", "no config.json: not a model folder"),
        ("run_folder", "no config.json: not a model folder; did you mean {path}/final?"),
        ("bad_json", "config.json is not valid JSON"),
        ("no_model_type", "config.json has no model_type: not a transformers model folder"),
        ("unknown_type", "model_type 'not-a-model' is not a transformers model"),
        ("no_weights", "a delulu config.json but no weights (model.safetensors)"),
        ("text_file", "a file, but not a ReDimNet .pt checkpoint"),
    ],
)
def test_cli_rejects_a_model_folder_that_is_not_a_model(tmp_path, synthetic, monkeypatch, kind, message):
    from delulu_hf.errors import UserError

    cli = _load_cli()
    monkeypatch.setattr(cli, "run_evaluation", lambda **_: pytest.fail("run_evaluation must not be reached"))
    path = _not_a_model(tmp_path, kind)
    argv = ["--model", str(path), "--data", str(synthetic[0]), "--output", str(tmp_path / "O")]
    with pytest.raises(UserError) as error:
        cli.main(argv)
    assert str(error.value).startswith(f"--model {path}: " + message.format(path=path)), str(error.value)
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "O")
    # The library says the same before it creates the output folder.
    with pytest.raises(UserError, match=re.escape(message.format(path=path))):
        run_evaluation(str(path), synthetic[0], tmp_path / "O", progress=False)
    assert not os.path.exists(tmp_path / "O")


def _cli_error(cli, argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run the CLI in-process as ``main_entry`` does: (exit code, the non-empty stderr lines)."""
    from delulu_hf.errors import UserError

    try:
        code = cli.main(argv)
    except UserError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        code = 2
    except SystemExit as exit_info:  # the argument parser's own errors
        code = exit_info.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_cli_user_errors_exit_2_with_one_line(tmp_path, synthetic, monkeypatch, capsys):
    """Bad values and malformed inputs: exit 2, one line, before any model is loaded or output created."""
    cli = _load_cli()
    monkeypatch.setattr(cli, "run_evaluation", lambda **_: pytest.fail("run_evaluation must not be reached"))
    corpus = synthetic[0]
    bad_data = tmp_path / "bad_data"
    bad_data.mkdir()
    (bad_data / "metadata.csv").write_text("file_name,gender\na.flac,f\n")
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    out = tmp_path / "O"
    cases = [
        (["--tasks", "verificaton"], "--tasks: unknown task(s) ['verificaton']"),
        (["--batch_seconds", "0"], "--batch_seconds must be positive, got 0.0"),
        (["--seed", "abc"], "invalid int value: 'abc'"),
        (["--model", str(not_a_model)], "no config.json: not a model folder"),
        (["--output", str(bad_data / "metadata.csv")], "is a file, expected a folder"),
    ]
    for extra, message in cases:
        args = {"--model": "mfcc", "--data": str(corpus), "--output": str(out), "--tasks": "verification"}
        args.update(dict(zip(extra[::2], extra[1::2])))
        code, lines = _cli_error(cli, [t for kv in args.items() for t in kv], capsys)
        assert code == 2, (extra, lines)
        assert len(lines) == 1 and lines[0].startswith("evaluate.py: error: ") and message in lines[0], lines
        assert not out.exists(), extra


def test_malformed_data_and_trials_fail_before_the_model_is_loaded(tmp_path, synthetic, monkeypatch, capsys):
    """metadata.csv without speaker_id, a trial naming an unknown file: one line, no model, no output."""
    import delulu_hf.evaluation.suite as suite

    monkeypatch.setattr(suite, "load_encoder", lambda *a, **k: pytest.fail("no model may be loaded"))
    cli = _load_cli()
    bad_data = tmp_path / "bad_data"
    bad_data.mkdir()
    (bad_data / "metadata.csv").write_text("file_name,gender\na.flac,f\n")
    bad_trials = tmp_path / "trials.csv"
    bad_trials.write_text("enroll_file,test_file,target\nspk4/utt0.flac,nobody.flac,1\n")
    out = tmp_path / "O"
    for extra, message in (
        (["--data", str(bad_data)], "missing column(s) ['speaker_id']"),
        (["--trials", str(bad_trials)], "test_file 'nobody.flac' is not in"),
    ):
        args = {
            "--model": "mfcc",
            "--data": str(synthetic[0]),
            "--output": str(out),
            "--tasks": "verification",
        }
        args.update(dict(zip(extra[::2], extra[1::2])))
        code, lines = _cli_error(cli, [t for kv in args.items() for t in kv], capsys)
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
        assert not out.exists()


def test_a_hub_id_that_does_not_load_is_one_line_and_leaves_no_output(tmp_path, synthetic, monkeypatch):
    """A typo'd or unreachable Hub id (nothing on disk): a UserError with transformers' first line."""
    import delulu_hf.evaluation.encoders as encoders
    from delulu_hf.errors import UserError

    def offline(*args, **kwargs):
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection."
        )

    monkeypatch.setattr(encoders, "TransformersEncoder", offline)
    out = tmp_path / "O"
    with pytest.raises(UserError) as error:
        run_evaluation("org/no-such-model", synthetic[0], out, progress=False)
    assert str(error.value) == (
        "model org/no-such-model: no such local folder, and loading it as a Hub id failed: "
        "We couldn't connect to 'https://huggingface.co' to load the files."
    )
    assert not out.exists()
