"""The replication experiment: plan, per-variant commands, aggregation, table, and the orchestration
end to end on a tiny synthetic corpus with a tiny encoder (the real ``--quick`` run is ``slow``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from delulu_hf import replication as R

ROOT = Path(__file__).resolve().parents[1]


def _labels(tmp_path: Path, name: str) -> R.LabelRun:
    folder = tmp_path / name
    return R.LabelRun(
        name, str(folder), str(folder / "dataset"), str(folder / "c.safetensors"), str(folder / "m.json"), {}
    )


def test_plan_defaults_follow_the_modes_and_the_demo_config():
    quick, full = R.make_plan(quick=True), R.make_plan()
    assert (quick.mode, quick.seeds, full.mode, full.seeds) == ("quick", (0,), "full", (0, 1, 2))
    assert quick.steps < full.steps and len(full.seeds) >= 2
    import yaml

    demo = yaml.safe_load(open(R.DEMO_CONFIG, encoding="utf-8"))
    assert full.k == demo["model"]["num_clusters"] and full.label_max_frames == demo["label_max_frames"]
    # The warmup keeps the demo's fraction of the run.
    assert full.warmup_steps == round(full.steps * demo["warmup_steps"] / demo["max_steps"])
    custom = R.make_plan(quick=True, seeds=[3, 4], steps=7)
    assert (custom.mode, custom.seeds, custom.steps) == ("custom", (3, 4), 7)
    with pytest.raises(ValueError, match="seed"):
        R.make_plan(seeds=[])
    with pytest.raises(ValueError, match="steps"):
        R.make_plan(steps=0)


def test_variants_differ_only_in_labels_and_lambda(tmp_path):
    plan = R.make_plan(quick=True, output=str(tmp_path))
    by_name = {v.name: v for v in plan.variants}
    assert set(by_name) == {"delulu", "delulu_lambda0", "mfcc_control", "delulu_window"}
    runs = {name: _labels(tmp_path, name) for name in R.LABEL_SETS}
    commands = {name: R.pretrain_command(plan, v, 0, runs[v.labels]) for name, v in by_name.items()}

    def options(cmd):
        return dict(zip(cmd[2::2], cmd[3::2]))

    base, lam0, control = (options(commands[n]) for n in ("delulu", "delulu_lambda0", "mfcc_control"))
    assert lam0["--model.denoise_loss_weight"] == "0.0" and "--model.denoise_loss_weight" not in base
    assert "--model.denoise_loss_weight" not in control  # same default lambda and corruption as DELULU
    label_keys = {"--dataset", "--centroids", "--model_config", "--output_dir"}
    assert {k for k in base if base[k] != control.get(k)} == label_keys
    assert control["--dataset"].endswith(os.path.join("mfcc", "dataset"))
    assert base["--max_steps"] == str(plan.steps) and base["--dataset_split"] == "train"
    window = options(commands["delulu_window"])
    assert {k for k in base if base[k] != window.get(k)} == label_keys
    assert window["--dataset"].endswith(os.path.join("redimnet_window", "dataset"))


def test_window_label_set_asks_prepare_labels_for_window_embeddings(tmp_path, monkeypatch):
    """The three label sets differ only in the featurizer flags given to prepare_labels."""
    plan = R.make_plan(quick=True, output=str(tmp_path), label_window_seconds=0.75)
    calls = {}

    def fake_run(cmd, log_path, what):
        calls[what] = cmd
        report = os.path.join(cmd[cmd.index("--report") + 1], "report.json")
        os.makedirs(os.path.dirname(report), exist_ok=True)
        with open(report, "w") as handle:
            json.dump({}, handle)

    monkeypatch.setattr(R, "_run", fake_run)
    from delulu_hf import DeluluConfig

    monkeypatch.setattr(R, "base_model_config", lambda plan: DeluluConfig())
    for name in R.LABEL_SETS:
        R.prepare_labels(plan, name, "TEACHER")
    flags = {
        name: [a for a in calls[f"labels ({name})"] if a in ("--features", "--teacher", "--teacher-output")]
        for name in R.LABEL_SETS
    }
    assert flags == {
        "redimnet": ["--teacher"],
        "redimnet_window": ["--teacher", "--teacher-output"],
        "mfcc": ["--features"],
    }
    window = calls["labels (redimnet_window)"]
    assert window[window.index("--teacher-output") + 1] == "window-embedding"
    assert window[window.index("--window-seconds") + 1] == "0.75"


def test_aggregate_mean_sample_std_and_missing_values():
    stats = R.aggregate([0.1, 0.3, None, float("nan")])
    assert stats["n"] == 2 and math.isclose(stats["mean"], 0.2)
    assert math.isclose(stats["std"], float(np.std([0.1, 0.3], ddof=1)))
    assert (stats["min"], stats["max"]) == (0.1, 0.3)
    single = R.aggregate([0.25])
    assert single["std"] is None and single["mean"] == 0.25
    assert R.aggregate([None])["mean"] is None
    assert R.format_cell(stats, percent=True) == "20.0 ± 14.1%"
    assert R.format_cell(single, percent=False) == "0.250"
    assert R.format_cell(R.aggregate([]), percent=True) == "-"


def _fake_results(eer: float, gender: float | None = 0.9) -> dict:
    per_layer = [
        {"layer": "conv", "eer": eer + 0.1},
        {"layer": "layer_1", "eer": eer - 0.05},
        {"layer": "last", "eer": eer},
    ]
    tasks = {
        "verification": {
            "eer": eer,
            "min_dcf_0.01": 0.9,
            "min_dcf_0.05": 0.7,
            "best_layer_eer": eer - 0.05,
            "best_layer_name": "layer_1",
            "per_layer": per_layer,
        },
        "counting": {"accuracy": 0.5},
        "diarization": {"error": "no mixtures"},
    }
    if gender is not None:
        tasks["profiling"] = {"gender": {"accuracy": gender}, "language": {"skipped": "no column"}}
    return {"tasks": tasks}


def test_headline_metrics_summary_table_and_verdict():
    m = R.headline_metrics(_fake_results(0.2))
    assert m["eer_last"] == 0.2 and math.isclose(m["eer_best"], 0.15) and m["gender_accuracy"] == 0.9
    assert (
        m["language_accuracy"] is None and m["der_known_collar_0"] is None and m["counting_accuracy"] == 0.5
    )
    name, value = R.per_layer_eer(_fake_results(0.2))[1]
    assert name == "layer_1" and math.isclose(value, 0.15)

    per_seed = {
        "delulu": [R.headline_metrics(_fake_results(0.10)), R.headline_metrics(_fake_results(0.12))],
        "mfcc_control": [R.headline_metrics(_fake_results(0.30)), R.headline_metrics(_fake_results(0.32))],
        "mfcc_mean": [R.headline_metrics(_fake_results(0.25, gender=None))],
    }
    summary = R.summarise(per_seed)
    assert math.isclose(summary["delulu"]["eer_last"]["mean"], 0.11)
    table = R.results_table(summary, {k: len(v) for k, v in per_seed.items()})
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and rows[0].startswith("| model | seeds | EER last layer")
    assert rows[1].startswith("| delulu | 2 | 11.0 ± 1.4% |")
    assert "| mfcc_mean | 1 | 25.0% |" in rows[3] and rows[3].count("| - |") >= 2
    assert "20.0 points below" in R.verdict(summary) and "more than twice" in R.verdict(summary)
    swapped = {"delulu": summary["mfcc_control"], "mfcc_control": summary["delulu"]}
    assert "NOT below" in R.verdict(swapped)
    one_seed = R.summarise({"delulu": per_seed["delulu"][:1], "mfcc_control": per_seed["mfcc_control"][:1]})
    assert "not conclusive" in R.verdict(one_seed)
    with_window = {**summary, "delulu_window": summary["delulu"]}
    text = R.verdict(with_window)
    assert text.count("20.0 points below") == 2 and "DELULU-window's" in text


def test_label_summary_reads_the_label_report():
    report = {
        "centroids": {"teacher": {"name": "mfcc"}},
        "diagnostics": {
            "k": 8,
            "frames": 100,
            "perplexity": 6.5,
            "dead_clusters": [3],
            "dominant_clusters": [],
            "speaker": {"purity": 0.4, "nmi": 0.2, "speaker_normalized_mi": 0.3},
        },
    }
    s = R.label_summary(report)
    assert (s["k"], s["dead_clusters"], s["speaker_purity"], s["speaker_nmi"], s["teacher"]) == (
        8,
        1,
        0.4,
        0.2,
        "mfcc",
    )


def _tiny_plan(tmp_path: Path, variants) -> R.ReplicationPlan:
    sys.path.insert(0, str(ROOT / "tests"))
    from audio_fixtures import write_tiny_audiofolder

    data = write_tiny_audiofolder(tmp_path / "corpus", num_speakers=5, utterances_per_speaker=3, seconds=1.2)
    tiny = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=[16] * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        final_dim=16,
    )
    return R.make_plan(
        quick=True,
        seeds=[0],
        steps=2,
        output=str(tmp_path / "run"),
        results_dir=str(tmp_path / "results"),
        data=str(data),
        mixtures=None,
        tasks=("verification", "profiling"),
        variants=variants,
        k=8,
        label_max_frames=2000,
        label_fit_hours=None,
        label_n_init=1,
        max_sample_length=12000,
        max_batch_samples=24000,
        model_overrides=tiny,
        progress=False,
    )


def _check_outputs(tmp_path: Path, plan: R.ReplicationPlan, results: dict) -> None:
    names = {v.name for v in plan.variants} | {"mfcc_mean", "random_init", "teacher"}
    assert set(results["summary"]) == names
    for name, stats in results["summary"].items():
        assert 0.0 <= stats["eer_last"]["mean"] <= 1.0, name
        assert stats["gender_accuracy"]["mean"] is not None, name
    from delulu_hf import DeluluConfig

    for v in plan.variants:  # every trained model is a save_pretrained folder with the shared config
        config = DeluluConfig.from_pretrained(tmp_path / "run" / "pretrain" / f"{v.name}-seed0" / "final")
        assert config.hidden_size == 32 and config.num_clusters == plan.k
        assert config.denoise_loss_weight == (0.1 if v.denoise_loss_weight is None else v.denoise_loss_weight)
    # Labels were fitted and assigned on the training speakers' items only.
    train_items = sum(1 for line in open(Path(plan.data) / "metadata.csv") if ",train," in line)
    for label_set, summary in results["labels"].items():
        assert summary["items"] == train_items and summary["speakers"] == 3, label_set
        assert (tmp_path / "run" / "labels" / label_set / "centroids.safetensors").is_file()
    assert (tmp_path / "run" / "teacher" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    assert saved["command"] == "test" and saved["eval_counts"]["verification_speakers"] == 2
    md = (tmp_path / "results" / "results.md").read_text()
    assert all(f"| {v.name} | 1 |" in md for v in plan.variants) and "speaker purity" in md
    for plot in ("det_zero_shot.png", "eer_per_layer.png", "loss_curves.png", "cluster_diagnostics.png"):
        assert (tmp_path / "results" / plot).stat().st_size > 1000, plot


def test_tiny_replication_orchestration(tmp_path):
    """Every stage for real on a tiny corpus, tiny encoder, 2 steps, one variant (MFCC labels, so
    two subprocesses): teacher copy, labels + report, pretraining, five evaluations, table, plots."""
    plan = _tiny_plan(tmp_path, (R.VARIANTS[2],))
    stages: list[str] = []
    results = R.run_replication(plan, command="test", stage_hook=stages.append)
    assert stages[:3] == ["teacher", "labels/mfcc", "pretrain/mfcc_control/seed0"]
    assert results["labels"]["mfcc"]["teacher"] == "mfcc"
    _check_outputs(tmp_path, plan, results)
    # A finished pretraining run is reused, not retrained.
    labels = R.prepare_labels(plan, "mfcc", str(tmp_path / "run" / "teacher"))
    final = tmp_path / "run" / "pretrain" / "mfcc_control-seed0" / "final"
    before = os.path.getmtime(final / "model.safetensors")
    assert R.pretrain(plan, R.VARIANTS[2], 0, labels) == str(final)
    assert os.path.getmtime(final / "model.safetensors") == before


@pytest.mark.slow
def test_tiny_replication_all_variants_and_rerun(tmp_path):
    """All four variants and the three label sets on the tiny corpus (~6 min on 2 busy cores)."""
    plan = _tiny_plan(tmp_path, R.VARIANTS)
    results = R.run_replication(plan, command="test")
    assert results["labels"]["redimnet"]["teacher"] != "mfcc"
    _check_outputs(tmp_path, plan, results)
    again = R.run_replication(plan, command="test")
    assert again["stage_seconds"]["pretrain/delulu/seed0"] < 1.0
    assert again["summary"]["delulu"]["eer_last"] == results["summary"]["delulu"]["eer_last"]


@pytest.mark.slow
def test_quick_mode_cli(tmp_path):
    """The real ``--quick`` run on the demo corpus (4.7 min on 2 idle cores; much longer when busy)."""
    out, res = tmp_path / "run", tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "training" / "replicate.py"), "--quick", "--output", str(out)]
    subprocess.run(cmd + ["--results-dir", str(res), "--no-progress"], check=True, cwd=ROOT)
    saved = json.loads((res / "results.json").read_text())
    assert saved["mode"] == "quick" and saved["wall_seconds"] > 0
    assert saved["summary"]["delulu"]["eer_last"]["mean"] is not None
    assert saved["summary"]["delulu_window"]["eer_last"]["mean"] is not None
    assert set(saved["labels"]) == set(R.LABEL_SETS)
