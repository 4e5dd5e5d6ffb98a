"""The replication experiment: plan, per-variant commands, aggregation, table, and the orchestration
end to end on a tiny synthetic corpus with a tiny encoder (the real ``--quick`` run is ``slow``)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    """``training/<name>.py`` as a module, by file path: putting ``training/`` on ``sys.path`` would
    shadow the ``evaluate`` package with ``training/evaluate.py`` for every later test."""
    module_name = f"delulu_training_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "training" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[module_name]


R = _load_script("replication")


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


def test_variants_differ_only_in_labels_lambda_and_distillation(tmp_path):
    plan = R.make_plan(quick=True, output=str(tmp_path))
    by_name = {v.name: v for v in plan.variants}
    assert set(by_name) == {
        "delulu",
        "delulu_lambda0",
        "mfcc_control",
        "delulu_window",
        "delulu_distill",
        "delulu_window_distill",
    }
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
    # Distillation: the run's teacher copy computes the targets; alone, the cluster ids get weight 0.
    distill, both = options(commands["delulu_distill"]), options(commands["delulu_window_distill"])
    assert {k for k in distill if distill[k] != base.get(k)} == {
        "--output_dir",
        "--teacher",
        "--model.distill_loss_weight",
        "--model.distill_target",
        "--model.distill_window_seconds",
        "--model.cluster_loss_weight",
    }
    assert distill["--teacher"] == os.path.join(plan.output, "teacher")
    assert distill["--model.cluster_loss_weight"] == "0.0" and distill["--model.distill_loss_weight"] == "1.0"
    assert distill["--model.distill_target"] == "window-embedding"
    assert {k for k in both if both[k] != window.get(k)} == {
        "--output_dir",
        "--teacher",
        "--model.distill_loss_weight",
        "--model.distill_target",
        "--model.distill_window_seconds",
    }
    assert not by_name["mfcc_control"].teacher_informed and by_name["delulu_distill"].teacher_informed


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
        name: [a for a in calls[f"labels ({name})"] if a in ("--features", "--teacher", "--teacher_output")]
        for name in R.LABEL_SETS
    }
    assert flags == {
        "redimnet": ["--teacher"],
        "redimnet_window": ["--teacher", "--teacher_output"],
        "mfcc": ["--features"],
    }
    window = calls["labels (redimnet_window)"]
    assert window[window.index("--teacher_output") + 1] == "window-embedding"
    assert window[window.index("--window_seconds") + 1] == "0.75"


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
    subprocess.run(cmd + ["--results_dir", str(res), "--no_progress"], check=True, cwd=ROOT)
    saved = json.loads((res / "results.json").read_text())
    assert saved["mode"] == "quick" and saved["wall_seconds"] > 0
    assert saved["summary"]["delulu"]["eer_last"]["mean"] is not None
    assert saved["summary"]["delulu_window"]["eer_last"]["mean"] is not None
    assert set(saved["labels"]) == set(R.LABEL_SETS)


# ---------------------------------------------------------------- the command line


def test_replicate_cli_flags_old_spellings_and_typos(capsys):
    cli = _load_script("replicate")
    args = cli.parse_args(["--quick", "--results_dir", "r", "--seeds", "3", "4", "--steps", "7"])
    assert (args.quick, args.results_dir, args.seed_list, args.steps) == (True, "r", [3, 4], 7)
    assert cli.parse_args([]).seed_list is None and not cli.parse_args([]).no_progress
    # The pre-0.2 spellings still work, with a deprecation warning.
    old = cli.parse_args(["--results-dir", "r", "--retrain-teacher", "--no-progress", "--seeds", "0,1,2"])
    assert (old.results_dir, old.retrain_teacher, old.no_progress, old.seed_list) == (
        "r",
        True,
        True,
        [0, 1, 2],
    )
    assert "--results-dir is deprecated, use --results_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--quik"])
    assert exit_info.value.code == 2
    assert "did you mean --quick?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--seeds", "0,x"])
    assert exit_info.value.code == 2 and "--seeds takes integers" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 16: downstream column, decision, GPU preset


def _stats(*eers: float) -> dict:
    return {"eer_last": R.aggregate(list(eers)), "eer_downstream": R.aggregate([e - 0.05 for e in eers])}


def test_downstream_eer_is_a_headline_metric():
    results = _fake_results(0.2)
    results["tasks"]["verification_downstream"] = {"eer": 0.12, "min_dcf_0.01": 0.8}
    assert R.headline_metrics(results)["eer_downstream"] == 0.12
    assert R.headline_metrics(_fake_results(0.2))["eer_downstream"] is None
    assert "verification_downstream" in R.make_plan(quick=True).tasks
    table = R.results_table(R.summarise({"m": [R.headline_metrics(results)]}), {"m": 1})
    assert "EER downstream" in table.splitlines()[0] and "| 12.0% |" in table


def test_decision_needs_both_references_both_metrics_and_twice_the_larger_std():
    summary = {
        "mfcc_control": _stats(0.40, 0.42, 0.38),
        "random_init": _stats(0.44, 0.45, 0.43),
        "delulu_window": _stats(0.20, 0.21, 0.19),
        "delulu": _stats(0.39, 0.30, 0.45),  # too noisy to count
    }
    assert R.beats(summary, "delulu_window", "mfcc_control", "eer_last")
    assert not R.beats(summary, "delulu", "mfcc_control", "eer_last")
    text = R.verdict(summary)
    assert "Decided: DELULU-window beat(s) both" in text and "DELULU," not in text.split("Decided:")[1]
    table = R.comparison_table(summary)
    assert table.splitlines()[0].startswith(
        "| model | vs mfcc_control, zero-shot | vs mfcc_control, downstream"
    )
    row = next(line for line in table.splitlines() if line.startswith("| delulu_window |"))
    assert row.count("**yes**") == 4 and "+20.0 (> 4.0? **yes**)" in row
    # downstream within noise for the only candidate: nothing is decided
    noisy = dict(summary)
    noisy["delulu_window"] = {
        "eer_last": summary["delulu_window"]["eer_last"],
        "eer_downstream": R.aggregate([0.30, 0.45, 0.20]),
    }
    assert "Not decided" in R.verdict(noisy)
    # one seed has no spread: never decided
    single = {k: {m: R.aggregate(v[m]["values"][:1]) for m in v} for k, v in summary.items()}
    assert "Not decided" in R.verdict(single)


def test_gpu_preset_and_its_cpu_dry_run(tmp_path):
    gpu = R.make_plan(preset="gpu", output=str(tmp_path))
    assert (gpu.mode, gpu.seeds, gpu.steps, gpu.parallel) == ("gpu", (0, 1, 2), R.GPU_PRESET["steps"], 6)
    assert gpu.model_overrides["hidden_size"] > 192 and gpu.max_batch_samples > 256000
    cmd = R.pretrain_command(gpu, R.VARIANTS[0], 0, _labels(tmp_path, "redimnet"))
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert cmd[cmd.index("--model.hidden_size") + 1] == "384"
    dry = R.make_plan(preset="gpu", dry_run=True, output=str(tmp_path))
    assert (dry.mode, dry.seeds, dry.steps) == ("gpu-dry-run", (0,), R.GPU_DRY_RUN_STEPS)
    assert dry.model_overrides == gpu.model_overrides and dry.parallel == gpu.parallel
    assert "--mixed_precision" not in R.pretrain_command(dry, R.VARIANTS[0], 0, _labels(tmp_path, "redimnet"))
    with pytest.raises(ValueError, match="preset"):
        R.make_plan(preset="tpu")
    with pytest.raises(ValueError, match="dry_run"):
        R.make_plan(dry_run=True)
    cli = _load_script("replicate")
    args = cli.parse_args(["--preset", "gpu", "--dry_run"])
    assert (args.preset, args.dry_run) == ("gpu", True)
    lines = cli.result_lines(
        {
            "mode": "gpu",
            "summary": {"delulu": _stats(0.2, 0.3), "mfcc_mean": {"eer_last": R.aggregate([0.4])}},
        }
    )
    assert lines[0] == "RESULT mode=gpu model=delulu seeds=2 eer_last=25.00+-7.07 eer_downstream=20.00+-7.07"
    assert lines[1] == "RESULT mode=gpu model=mfcc_mean seeds=1 eer_last=40.00"


@pytest.mark.slow
def test_tiny_replication_distillation_and_downstream(tmp_path):
    """The distillation variant (teacher in the training step, cluster loss off) and the downstream
    x-vector column, for real on the tiny corpus (~4.5 min on 2 busy cores)."""
    distill = next(v for v in R.VARIANTS if v.name == "delulu_distill")
    plan = _tiny_plan(tmp_path, (distill,))
    plan.tasks = ("verification", "verification_downstream", "profiling")
    results = R.run_replication(plan, command="test")
    stats = results["summary"]["delulu_distill"]
    assert 0.0 <= stats["eer_last"]["mean"] <= 1.0 and 0.0 <= stats["eer_downstream"]["mean"] <= 1.0
    assert results["summary"]["mfcc_mean"]["eer_downstream"]["mean"] is not None
    final = tmp_path / "run" / "pretrain" / "delulu_distill-seed0" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["distill_loss_weight"] == 1.0 and config["cluster_loss_weight"] == 0.0
    assert (final / "distill_targets.json").is_file()
    md = (tmp_path / "results" / "results.md").read_text()
    assert "EER downstream" in md and "| delulu_distill |" in md
