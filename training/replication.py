"""Small-scale replication of DELULU's central claim: speaker-aware labels vs content (MFCC) labels.

In: a corpus, a teacher and the demo config; out: ``results.json``, ``results.md`` and plots. This is
an experiment, not library code: it lives beside its command line (``training/replicate.py``) and
uses only the package-level names of ``delulu_hf``.

At equal data, model size, steps and seeds, an encoder pretrained on ReDimNet k-means ids (DELULU)
should carry more speaker information than one pretrained on MFCC k-means ids (the HuBERT-style
control). This module is the experiment's plan and orchestration; every stage is the project's own
code, so the replication measures the pipeline that ships:

1. teacher: the committed demo teacher (copied into the run) or one retrained with
   ``delulu_hf.teacher.training.train_teacher`` on the training speakers;
2. labels: ``training/prepare_labels.py`` with the teacher and with MFCC features, same k and fit
   settings as ``training/configs/demo.yaml``, training split only, with the purity/NMI report;
3. pretraining: ``training/pretrain.py`` (subprocesses, so each run has a fresh accelerate state)
   for every variant x seed, identical encoder config and steps;
4. evaluation: ``delulu_hf.evaluation.run_evaluation`` on the held-out speakers, plus the
   references that need no pretraining (MFCC mean, a randomly initialised encoder, the teacher);
5. aggregation over seeds (mean, sample std, min/max), ``results.json``, a Markdown table, plots.

The evaluation seed is fixed (0) for every model so all models see the same trials, probe splits
and generated mixtures; only the pretraining seed varies across repeats.

When ``training/replicate.py`` runs, ``training/`` is ``sys.path[0]``, so ``training/evaluate.py``
shadows the Hugging Face ``evaluate`` library in that process. That is harmless: nothing run here
imports ``evaluate`` (the evaluation calls ``delulu_hf.evaluation`` directly; transformers,
accelerate and datasets do not import it), and tests load this file by path, never by putting
``training/`` on ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from delulu_hf.atomic import (
    TMP_PREFIX,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    fsync_tree,
    replace_dir,
)

logger = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "training", "configs", "demo.yaml")
EVAL_TASKS = ("verification", "verification_downstream", "profiling", "counting", "diarization")
QUICK_STEPS, FULL_STEPS = 20, 1600
FULL_SEEDS = (0, 1, 2)  # the control's EER spread over 2 seeds was 4 points: 3 seeds give a usable std
EVAL_SEED = 0  # identical trials / probe splits / generated mixtures for every model


@dataclasses.dataclass(frozen=True)
class Variant:
    """One pretrained encoder recipe; everything not named here is shared by all variants."""

    name: str
    labels: str  # "redimnet" (teacher k-means) or "mfcc" (HuBERT-style control)
    denoise_loss_weight: float | None  # None: the DeluluConfig default (lambda = 0.1)
    description: str
    # Teacher distillation (DeluluConfig.distill_*): 0 = off. With cluster_loss_weight 0 the cluster
    # ids only mark real frames and the regression alone trains the encoder.
    distill_loss_weight: float = 0.0
    cluster_loss_weight: float = 1.0
    distill_target: str = "window-embedding"

    @property
    def teacher_informed(self) -> bool:
        """Whether the teacher shapes the targets (its k-means ids or its features)."""
        return self.labels != "mfcc" or self.distill_loss_weight > 0


VARIANTS: tuple[Variant, ...] = (
    Variant("delulu", "redimnet", None, "ReDimNet labels, masked + denoising (default lambda)"),
    Variant(
        "delulu_lambda0",
        "redimnet",
        0.0,
        "ReDimNet labels, lambda = 0 (masked loss only; inputs still corrupted)",
    ),
    Variant("mfcc_control", "mfcc", None, "MFCC labels, masked + the same denoising corruption/lambda"),
    Variant(
        "delulu_window",
        "redimnet_window",
        None,
        "labels from ReDimNet's embedding head over a 1 s window per frame (our reading of 'frame-level "
        "speaker embeddings'), default lambda",
    ),
    Variant(
        "delulu_distill",
        "redimnet",
        None,
        "no k-means: regression (cosine) of the teacher's standardised 1 s window embeddings at every frame "
        "(DistilHuBERT-style distillation; cluster loss weight 0, inputs corrupted as for DELULU)",
        distill_loss_weight=1.0,
        cluster_loss_weight=0.0,
    ),
    Variant(
        "delulu_window_distill",
        "redimnet_window",
        None,
        "delulu_window's masked cluster loss plus the delulu_distill regression (weight 1 each)",
        distill_loss_weight=1.0,
    ),
)
# "redimnet": the paper's pre-pooling frame features; "redimnet_window": sliding-window embeddings
# (``ReDimNetWindowEmbeddings``); "mfcc": HuBERT's first-iteration control.
LABEL_SETS = ("redimnet", "redimnet_window", "mfcc")

# Headline metrics: key -> (label in the table, lower is better, shown as percent).
METRICS: dict[str, tuple[str, bool, bool]] = {
    "eer_last": ("EER last layer", True, True),
    "eer_best": ("EER best layer", True, True),
    "eer_downstream": ("EER downstream", True, True),
    "min_dcf_0.01_last": ("minDCF0.01 last", True, False),
    "min_dcf_0.05_last": ("minDCF0.05 last", True, False),
    "gender_accuracy": ("gender acc", False, True),
    "language_accuracy": ("language acc", False, True),
    "counting_accuracy": ("count acc", False, True),
    "der_known_collar_0": ("DER (known #spk, c0)", True, True),
}


@dataclasses.dataclass
class ReplicationPlan:
    """Everything a run needs; ``make_plan`` fills it for ``--quick`` and the full mode."""

    output: str
    results_dir: str
    mode: str  # "quick" | "full" | "custom"
    seeds: tuple[int, ...]
    steps: int
    warmup_steps: int
    data: str = os.path.join(REPO, "data", "demo_corpus")
    mixtures: str | None = os.path.join(REPO, "data", "demo_mixtures")
    teacher: str = os.path.join(REPO, "data", "demo_teacher")
    retrain_teacher: bool = False
    teacher_steps: int = 300
    noise_dir: str | None = os.path.join(REPO, "data", "demo_noise")
    base_config: str = DEMO_CONFIG
    variants: tuple[Variant, ...] = VARIANTS
    tasks: tuple[str, ...] = EVAL_TASKS
    k: int = 100
    label_max_frames: int = 60_000
    label_fit_hours: float | None = 0.25
    label_n_init: int = 3
    label_window_seconds: float = 1.0  # window of the "redimnet_window" label set
    max_train_items: int | None = None  # a seeded subset of training items (tests only)
    max_sample_length: int | None = None  # None: the base config's crop length
    max_batch_samples: int | None = None  # None: the base config's batch size
    eval_batch_seconds: float = 60.0
    eval_mixtures_per_count: int = 12
    model_overrides: dict = dataclasses.field(default_factory=dict)  # tiny encoders in tests
    progress: bool = True
    preset: str | None = None  # "gpu": GPU_PRESET's larger student and longer runs
    pretrain_args: tuple[str, ...] = ()  # extra training/pretrain.py flags (e.g. bf16, data workers)
    parallel: int = 1  # pretraining runs and evaluations at a time (subprocesses / worker processes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["variants"] = [dataclasses.asdict(v) for v in self.variants]
        return out


def _base_config_values(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


# The GPU preset (``--preset gpu``): the same table with a 4x wider, 1.5x deeper student, 4x more audio
# per step and 2.5x the steps, sized for <= 8 minutes on one H200 with runs in parallel (an estimate from
# FLOP counts: no GPU has run it yet; see results/small_scale/README.md). ``--dry_run`` keeps everything
# but runs GPU_DRY_RUN_STEPS steps with one seed, to check the code path on a CPU.
GPU_PRESET: dict[str, Any] = {
    "steps": 4000,
    "max_batch_samples": 16000 * 64,
    "max_sample_length": 16000 * 2,
    "model_overrides": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "conv_dim": [256] * 7,
        "final_dim": 256,
    },
    "pretrain_args": ("--mixed_precision", "bf16", "--num_workers", "2"),
    "parallel": 6,
    "eval_batch_seconds": 240.0,
}
GPU_DRY_RUN_STEPS = 3


def make_plan(
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    steps: int | None = None,
    output: str = "runs/replicate",
    results_dir: str = "results/small_scale",
    retrain_teacher: bool = False,
    preset: str | None = None,
    dry_run: bool = False,
    **overrides: Any,
) -> ReplicationPlan:
    """The experiment plan.

    Full mode: 4 variants x 3 seeds x FULL_STEPS (1600) steps, about 14 passes over the 30-minute
    training split: the 300-step demo run is still at chance for speakers, so the comparison is
    made after the masked loss has clearly dropped. Quick mode: one seed, 20 steps, the whole
    pipeline (three label sets, four pretraining runs, seven evaluations); its numbers are a check
    of the pipeline, not evidence about the claim. Measured wall times are in
    results/small_scale; on a shared, loaded machine both take several times longer.
    ``k`` and the label fit settings come from the base (demo) config so the labels match it.
    """
    base = _base_config_values(overrides.get("base_config", DEMO_CONFIG))
    if preset not in (None, "gpu"):
        raise ValueError(f"unknown preset {preset!r}; choose 'gpu'")
    if dry_run and preset is None:
        raise ValueError("--dry_run goes with --preset gpu (it checks that preset's code path on a CPU)")
    if preset == "gpu":
        gpu = {k: v for k, v in GPU_PRESET.items() if k != "steps"}
        overrides = {**gpu, **overrides, "preset": "gpu"}
        if steps is None:
            steps = GPU_DRY_RUN_STEPS if dry_run else GPU_PRESET["steps"]
        if dry_run:
            seeds = seeds if seeds is not None else (0,)
            overrides["pretrain_args"] = ("--num_workers", "1")  # no bf16 on a CPU
    if seeds is not None and len(seeds) == 0:
        raise ValueError("--seeds needs at least one seed")
    if seeds is None:
        seeds = (0,) if quick else FULL_SEEDS
    if steps is None:
        steps = QUICK_STEPS if quick else FULL_STEPS
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    mode = "quick" if quick else "full"
    if preset == "gpu":
        mode = "gpu-dry-run" if dry_run else "gpu"
    elif (quick and (tuple(seeds) != (0,) or steps != QUICK_STEPS)) or (
        not quick and (tuple(seeds) != FULL_SEEDS or steps != FULL_STEPS)
    ):
        mode = "custom"
    base_warmup, base_steps = int(base.get("warmup_steps", 40)), int(base.get("max_steps", 300))
    values: dict[str, Any] = dict(
        output=output,
        results_dir=results_dir,
        mode=mode,
        seeds=tuple(int(s) for s in seeds),
        steps=int(steps),
        # Same warmup fraction as the demo run (40 of 300 steps), whatever the length.
        warmup_steps=max(1, round(steps * base_warmup / base_steps)),
        retrain_teacher=retrain_teacher,
        k=int((base.get("model") or {}).get("num_clusters", 100)),
        label_max_frames=int(base.get("label_max_frames", 60_000)),
        label_fit_hours=base.get("label_fit_hours"),
        label_n_init=int(base.get("label_kmeans_n_init") or 3),
    )
    values.update(overrides)
    if "variants" in values:
        values["variants"] = tuple(values["variants"])
    plan = ReplicationPlan(**values)
    unknown = [t for t in plan.tasks if t not in EVAL_TASKS]
    if unknown:
        raise ValueError(f"unsupported evaluation task(s) {unknown}")
    return plan


# =============================================================================================
# Stages
# =============================================================================================


def _publish_dir(dest: str, build: Callable[[str], None]) -> None:
    """``build(tmp)`` a folder beside ``dest`` and swap it into place (``delulu_hf.atomic``), so a
    killed run leaves either no ``dest`` or a complete one, never a half-copied model."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{os.path.basename(dest)}-")
    try:
        build(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cmd: list[str], log_path: str, what: str) -> None:
    """Run a stage as a subprocess, its output in ``log_path``; a failure names the stage and log."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    logger.info("%s: %s", what, " ".join(cmd))
    with open(log_path, "w", encoding="utf-8") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            tail = log.read()[-2000:]
        raise RuntimeError(f"{what} failed (exit {done.returncode}); log {log_path}:\n{tail}")


def prepare_teacher(plan: ReplicationPlan) -> str:
    """``OUTPUT/teacher``: the committed teacher (copied, so the run folder is self-contained) or a
    ReDimNet retrained on the training speakers only (the test split is used only for its EER)."""
    dest = os.path.join(plan.output, "teacher")
    if os.path.isfile(os.path.join(dest, "config.json")) and os.path.isfile(
        os.path.join(dest, "model.safetensors")
    ):
        return dest
    if plan.retrain_teacher:
        from delulu_hf.teacher.training import TeacherTrainingConfig, train_teacher

        summary_path = os.path.join(plan.teacher, "train_summary.json")
        overrides = {}
        if os.path.isfile(summary_path):  # same architecture as the committed teacher
            with open(summary_path, encoding="utf-8") as handle:
                overrides = json.load(handle).get("model_overrides", {}) or {}
        trials = os.path.join(plan.data, "trials.csv")
        train_teacher(
            TeacherTrainingConfig(
                data=plan.data,
                output_dir=dest,
                model_overrides=overrides,
                trials=trials if os.path.isfile(trials) else None,
                noise_dir=plan.noise_dir,
                max_steps=plan.teacher_steps,
                seed=plan.seeds[0],
            )
        )
        return dest
    _publish_dir(dest, lambda tmp: shutil.copytree(plan.teacher, tmp, dirs_exist_ok=True))
    return dest


def base_model_config(plan: ReplicationPlan):
    """The shared encoder config: the base YAML's ``model`` block (+ test overrides), with the
    label provenance fields cleared so each label run fills in its own teacher name and dim."""
    from delulu_hf import pretraining as P

    cfg = P.parse_config([], default_config=plan.base_config)
    cfg.model = {**cfg.model, **plan.model_overrides, "num_clusters": plan.k}
    config = P.build_model_config(cfg)
    config.label_teacher_name = None
    config.label_feature_dim = None
    return config


@dataclasses.dataclass
class LabelRun:
    """Where one label set lives and what its diagnostics say."""

    name: str
    folder: str
    dataset: str
    centroids: str
    model_config: str
    report: dict[str, Any]


def prepare_labels(plan: ReplicationPlan, label_set: str, teacher: str) -> LabelRun:
    """``OUTPUT/labels/<set>``: centroids, labelled training split, model config and the report
    (occupancy, purity/NMI vs speakers, frame alignment). Reused when already complete."""
    if label_set not in LABEL_SETS:
        raise ValueError(f"unknown label set {label_set!r}; choose from {LABEL_SETS}")
    folder = os.path.join(plan.output, "labels", label_set)
    report_path = os.path.join(folder, "report", "report.json")
    if not os.path.isfile(report_path):
        os.makedirs(folder, exist_ok=True)
        config_path = os.path.join(folder, "base_model_config.json")
        base_model_config(plan).to_json_file(config_path)
        source = ["--features", "mfcc"] if label_set == "mfcc" else ["--teacher", teacher]
        if label_set == "redimnet_window":
            source += [
                "--teacher_output",
                "window-embedding",
                "--window_seconds",
                str(plan.label_window_seconds),
            ]
        cmd = [sys.executable, os.path.join(REPO, "training", "prepare_labels.py"), "--data", plan.data]
        cmd += ["--split", "train", *source, "--model_config", config_path, "--k", str(plan.k)]
        cmd += ["--max_frames", str(plan.label_max_frames), "--n_init", str(plan.label_n_init)]
        if plan.label_fit_hours is not None:
            cmd += ["--fit_hours", str(plan.label_fit_hours)]
        cmd += ["--output", folder, "--report", os.path.join(folder, "report")]
        cmd += ["--cache_dir", os.path.join(plan.output, "cache", "datasets")]
        _run(cmd, os.path.join(folder, "prepare_labels.log"), f"labels ({label_set})")
    with open(report_path, encoding="utf-8") as handle:
        report = json.load(handle)
    return LabelRun(
        name=label_set,
        folder=folder,
        dataset=os.path.join(folder, "dataset"),
        centroids=os.path.join(folder, "centroids.safetensors"),
        model_config=os.path.join(folder, "model_config.json"),
        report=report,
    )


def pretrain_command(plan: ReplicationPlan, variant: Variant, seed: int, labels: LabelRun) -> list[str]:
    """The ``training/pretrain.py`` invocation for one variant and seed (only λ differs by variant)."""
    out = os.path.join(plan.output, "pretrain", f"{variant.name}-seed{seed}")
    cmd = [sys.executable, os.path.join(REPO, "training", "pretrain.py"), "--config", plan.base_config]
    cmd += ["--output_dir", out, "--seed", str(seed), "--max_steps", str(plan.steps)]
    cmd += ["--warmup_steps", str(plan.warmup_steps), "--save_steps", str(plan.steps)]
    cmd += ["--logging_steps", str(max(1, min(10, plan.steps // 8)))]
    cmd += ["--dataset", labels.dataset, "--dataset_split", "train", "--centroids", labels.centroids]
    cmd += ["--model_config", labels.model_config, "--report_to", "none", "--save_total_limit", "1"]
    if plan.noise_dir:
        cmd += ["--noise_dir", plan.noise_dir]
    if plan.max_train_items is not None:
        cmd += ["--max_train_items", str(plan.max_train_items)]
    if plan.max_sample_length is not None:
        cmd += ["--max_sample_length", str(plan.max_sample_length)]
        cmd += ["--min_sample_length", str(min(16000, plan.max_sample_length))]
    if plan.max_batch_samples is not None:
        cmd += ["--max_batch_samples", str(plan.max_batch_samples)]
    cmd += list(plan.pretrain_args)
    for key, value in {**plan.model_overrides, "num_clusters": plan.k}.items():
        cmd += [f"--model.{key}", json.dumps(value)]
    if variant.denoise_loss_weight is not None:
        cmd += ["--model.denoise_loss_weight", str(float(variant.denoise_loss_weight))]
    if variant.distill_loss_weight > 0:  # the run's teacher copy computes the targets in every step
        cmd += ["--teacher", os.path.join(plan.output, "teacher")]
        cmd += ["--model.distill_loss_weight", str(float(variant.distill_loss_weight))]
        cmd += ["--model.distill_target", variant.distill_target]
        cmd += ["--model.distill_window_seconds", str(float(plan.label_window_seconds))]
    if variant.cluster_loss_weight != 1.0:
        cmd += ["--model.cluster_loss_weight", str(float(variant.cluster_loss_weight))]
    return cmd


def pretrain(plan: ReplicationPlan, variant: Variant, seed: int, labels: LabelRun) -> str:
    """Train one encoder; returns its ``save_pretrained`` folder (reused when already complete)."""
    out = os.path.join(plan.output, "pretrain", f"{variant.name}-seed{seed}")
    final = os.path.join(out, "final")
    done = os.path.join(final, "training_config.json")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as handle:
            if json.load(handle).get("max_steps") == plan.steps:
                return final
    _run(pretrain_command(plan, variant, seed, labels), os.path.join(out, "pretrain.log"), f"pretrain {out}")
    return final


def random_init_model(plan: ReplicationPlan, labels: LabelRun, seed: int) -> str:
    """A randomly initialised encoder with the shared config, saved like a trained one: the
    "no pretraining" reference that says how much speaker information the architecture alone gives."""
    import torch

    from delulu_hf import DeluluConfig, DeluluForPreTraining, default_feature_extractor

    folder = os.path.join(plan.output, "random_init", f"seed{seed}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    config = DeluluConfig.from_json_file(labels.model_config)
    for key, value in plan.model_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = DeluluForPreTraining(config)

    def save(tmp: str) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        default_feature_extractor(config, do_normalize=True).save_pretrained(tmp)

    _publish_dir(folder, save)
    return folder


def evaluate(plan: ReplicationPlan, name: str, model: str) -> dict[str, Any]:
    """``run_evaluation`` for one model on the held-out speakers; the zero-shot scores of every
    layer are kept in ``curves.npz`` for the combined DET plot."""
    import torch

    from delulu_hf.evaluation import run_evaluation

    out = os.path.join(plan.output, "eval", name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = run_evaluation(
        model=model,
        data=plan.data,
        output=out,
        tasks=list(plan.tasks),
        mixtures=plan.mixtures,
        device=device,
        batch_seconds=plan.eval_batch_seconds,
        seed=EVAL_SEED,
        cache_dir=os.path.join(out, "cache"),
        mixtures_per_count=plan.eval_mixtures_per_count,
        command=f"training/replication.py evaluate({name!r}, {model!r})",
        progress=plan.progress,
    )
    curves = results.get("tasks", {}).get("verification", {}).get("_curves", {})
    arrays = {}
    for i, (_name, (scores, target)) in enumerate(curves.items()):
        arrays[f"scores_{i}"], arrays[f"labels_{i}"] = np.asarray(scores), np.asarray(target)
    if arrays:  # the temporary name ends in .npz, so np.savez keeps it as given
        atomic_write(
            os.path.join(out, "curves.npz"), lambda tmp: np.savez(tmp, names=np.array(list(curves)), **arrays)
        )
    return results


def load_curves(eval_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The DET inputs ``evaluate`` kept (empty when verification did not run)."""
    path = os.path.join(eval_dir, "curves.npz")
    if not os.path.isfile(path):
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {str(n): (data[f"scores_{i}"], data[f"labels_{i}"]) for i, n in enumerate(data["names"])}


# =============================================================================================
# Aggregation and reporting
# =============================================================================================


def headline_metrics(results: dict[str, Any]) -> dict[str, float | None]:
    """The table's numbers from one ``run_evaluation`` result (None where a task did not run)."""
    tasks = results.get("tasks", {})

    def get(task: str, *keys: str) -> float | None:
        value: Any = tasks.get(task)
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return {
        "eer_last": get("verification", "eer"),
        "eer_best": get("verification", "best_layer_eer"),
        "eer_downstream": get("verification_downstream", "eer"),
        "min_dcf_0.01_last": get("verification", "min_dcf_0.01"),
        "min_dcf_0.05_last": get("verification", "min_dcf_0.05"),
        "gender_accuracy": get("profiling", "gender", "accuracy"),
        "language_accuracy": get("profiling", "language", "accuracy"),
        "counting_accuracy": get("counting", "accuracy"),
        "der_known_collar_0": get("diarization", "der_known_collar_0"),
    }


def per_layer_eer(results: dict[str, Any]) -> list[tuple[str, float]]:
    """(layer name, EER) for every layer of the zero-shot verification."""
    entries = results.get("tasks", {}).get("verification", {}).get("per_layer", [])
    return [(str(e["layer"]), float(e["eer"])) for e in entries]


def aggregate(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof 1; None for one seed), min, max over seeds."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": []}
    arr = np.asarray(kept)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": len(kept),
        "values": kept,
    }


def summarise(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: [metrics of seed 0, seed 1, ...]}`` -> ``{model: {metric: aggregate}}``."""
    return {
        model: {key: aggregate([run.get(key) for run in runs]) for key in METRICS}
        for model, runs in per_seed.items()
    }


def format_cell(stats: dict[str, Any], percent: bool) -> str:
    """``mean ± std`` (percent or 3 decimals); ``-`` when missing; no ± for a single seed."""
    if stats.get("mean") is None:
        return "-"
    scale, unit, digits = (100.0, "%", 1) if percent else (1.0, "", 3)
    text = f"{stats['mean'] * scale:.{digits}f}"
    if stats.get("std") is not None:
        text += f" ± {stats['std'] * scale:.{digits}f}"
    return text + unit


def results_table(summary: dict[str, dict[str, dict[str, Any]]], seeds_of: dict[str, int]) -> str:
    """The Markdown results table: one row per model, mean ± std over seeds."""
    header = "| model | seeds | " + " | ".join(label for label, _, _ in METRICS.values()) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for model, stats in summary.items():
        cells = [format_cell(stats[key], pct) for key, (_, _, pct) in METRICS.items()]
        lines.append(f"| {model} | {seeds_of.get(model, 1)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def label_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The label-quality numbers that explain a result: occupancy and speaker structure."""
    diag = report.get("diagnostics", {})
    speaker = diag.get("speaker", {})
    return {
        "k": diag.get("k"),
        "frames": diag.get("frames"),
        "items": diag.get("items"),
        "perplexity": diag.get("perplexity"),
        "normalized_entropy": diag.get("normalized_entropy"),
        "used_clusters": diag.get("used_clusters"),
        "dead_clusters": len(diag.get("dead_clusters", [])),
        "dominant_clusters": len(diag.get("dominant_clusters", [])),
        "speaker_purity": speaker.get("purity"),
        "speaker_nmi": speaker.get("nmi"),
        "speaker_normalized_mi": speaker.get("speaker_normalized_mi"),
        "per_speaker_clusters_used_mean": speaker.get("per_speaker_clusters_used_mean"),
        "speakers": speaker.get("speakers"),
        "teacher": (report.get("centroids") or {}).get("teacher", {}).get("name"),
    }


# Teacher-informed models named in the verdict, in table order.
VERDICT_LABELS = {
    "delulu": "DELULU",
    "delulu_window": "DELULU-window",
    "delulu_distill": "DELULU-distill",
    "delulu_window_distill": "DELULU-window+distill",
}
# A teacher-informed model "beats" a reference in a metric when its mean EER is lower by more than
# twice the larger of the two seed stds (both need >= 2 seeds, or the reference has no spread at all).
DECISION_METRICS = ("eer_last", "eer_downstream")
DECISION_REFERENCES = ("mfcc_control", "random_init")


def verdict(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One sentence per teacher-informed model comparing its zero-shot last-layer EER with the
    control's, with the seed spread, then the decision: which of them beat both the MFCC control and
    the untrained encoder in zero-shot *and* downstream EER by more than twice the larger seed std."""
    sentences = [_compare(summary, "delulu", "DELULU")]
    for name, label in VERDICT_LABELS.items():
        if name != "delulu" and name in summary:
            sentences.append(_compare(summary, name, label))
    measured = [n for n in VERDICT_LABELS if n in summary and all(r in summary for r in DECISION_REFERENCES)]
    if measured:
        winners = [
            n
            for n in measured
            if all(beats(summary, n, r, m) for r in DECISION_REFERENCES for m in DECISION_METRICS)
        ]
        if winners:
            sentences.append(
                "Decided: "
                + ", ".join(VERDICT_LABELS[n] for n in winners)
                + " beat(s) both the MFCC control and "
                "the untrained encoder in zero-shot and downstream EER by more than twice the larger seed std."
            )
        else:
            sentences.append(
                "Not decided: no teacher-informed model beats both the MFCC control and the untrained encoder in "
                "zero-shot and downstream EER by more than twice the larger seed std."
            )
    return " ".join(sentences)


def beats(summary: dict[str, dict[str, dict[str, Any]]], name: str, reference: str, metric: str) -> bool:
    """``name``'s mean ``metric`` (an error rate) is below ``reference``'s by more than twice the larger
    seed std; needs a spread for ``name`` (>= 2 seeds)."""
    a = summary.get(name, {}).get(metric, {})
    b = summary.get(reference, {}).get(metric, {})
    if a.get("mean") is None or b.get("mean") is None or a.get("std") is None:
        return False
    if b.get("std") is None and b.get("n", 1) > 1:
        return False
    spread = max(a["std"], b.get("std") or 0.0)
    return b["mean"] - a["mean"] > 2 * spread


def comparison_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: each teacher-informed model's EER gap to each reference (points; + = better) with the
    threshold (twice the larger seed std) and whether it is passed."""
    rows = []
    for name in VERDICT_LABELS:
        if name not in summary:
            continue
        cells = []
        for reference in DECISION_REFERENCES:
            for metric in DECISION_METRICS:
                a, b = summary[name].get(metric, {}), summary.get(reference, {}).get(metric, {})
                if a.get("mean") is None or b.get("mean") is None:
                    cells.append("-")
                    continue
                gap = 100 * (b["mean"] - a["mean"])
                bar = 200 * max(a.get("std") or 0.0, b.get("std") or 0.0)
                mark = "**yes**" if beats(summary, name, reference, metric) else "no"
                cells.append(f"{gap:+.1f} (> {bar:.1f}? {mark})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    header = "| model | " + " | ".join(
        f"vs {r}, {'zero-shot' if m == 'eer_last' else 'downstream'}"
        for r in DECISION_REFERENCES
        for m in DECISION_METRICS
    )
    return "\n".join([header + " |", "|---|" + "---|" * 4, *rows]) + "\n"


def _compare(summary: dict[str, dict[str, dict[str, Any]]], name: str, label: str) -> str:
    a = summary.get(name, {}).get("eer_last", {})
    b = summary.get("mfcc_control", {}).get("eer_last", {})
    if a.get("mean") is None or b.get("mean") is None:
        return f"{label} vs control: not measured."
    diff = b["mean"] - a["mean"]
    spread = max(a.get("std") or 0.0, b.get("std") or 0.0)
    if a.get("std") is None or b.get("std") is None:
        qualifier = "single seed, no spread: not conclusive"
    elif abs(diff) > 2 * spread:
        qualifier = "more than twice the larger seed std"
    else:
        qualifier = "within twice the larger seed std: not conclusive"
    if diff > 0:
        return f"{label}'s zero-shot EER is {100 * diff:.1f} points below the MFCC control's ({qualifier})."
    return f"{label}'s zero-shot EER is NOT below the MFCC control's: {100 * -diff:.1f} points higher ({qualifier})."


# ---- plots ----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def plot_det(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str, title: str) -> str:
    """DET curves of several models on one set of axes (the evaluation module's plotter)."""
    from delulu_hf.evaluation import plot_det_curves

    return str(plot_det_curves(curves, path, title=title))


def plot_eer_per_layer(layers: dict[str, list[list[tuple[str, float]]]], path: str) -> str:
    """Zero-shot EER of every layer, mean over seeds with min-max bars, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for model, runs in layers.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        names = [n for n, _ in runs[0]]
        values = np.array([[e for _, e in r] for r in runs if len(r) == len(names)]) * 100
        x = np.arange(len(names))
        mean = values.mean(axis=0)
        ax.plot(x, mean, marker="o", label=f"{model} (n={len(values)})")
        if len(values) > 1:
            ax.fill_between(x, values.min(axis=0), values.max(axis=0), alpha=0.2)
        if len(names) <= 12:
            for xi, name in zip(x, names):
                ax.annotate(name, (xi, mean[xi]), fontsize=6, alpha=0.6, rotation=30)
    ax.set_xlabel("layer index (0 = first stream)")
    ax.set_ylabel("zero-shot EER (%)")
    ax.set_title("EER per layer (held-out speakers)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_loss_curves(metric_files: dict[str, str], path: str) -> str | None:
    """Masked loss and masked-frame accuracy against step for every pretraining run."""
    from delulu_hf import pretraining as P

    records = {name: P.MetricsLog.read(f) for name, f in metric_files.items()}
    records = {name: r for name, r in records.items() if r}
    if not records:
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, recs) in enumerate(sorted(records.items())):
        steps = [r["step"] for r in recs]
        colour = f"C{i % 10}"
        ax_loss.plot(steps, [r.get("masked_loss", float("nan")) for r in recs], color=colour, label=name)
        ax_acc.plot(steps, [r.get("masked_accuracy", float("nan")) for r in recs], color=colour, label=name)
    ax_loss.set_xlabel("step"), ax_loss.set_ylabel("masked cross-entropy")
    ax_acc.set_xlabel("step"), ax_acc.set_ylabel("masked-frame accuracy")
    ax_loss.legend(fontsize=7)
    ax_loss.set_title(
        "Note: ReDimNet and MFCC targets differ, losses are not comparable across label sets", fontsize=7
    )
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_cluster_diagnostics(label_runs: dict[str, LabelRun], path: str) -> str:
    """Both label sets side by side: speaker purity/NMI/normalised MI and sorted cluster occupancy."""
    plt = _pyplot()
    fig, (ax_bar, ax_occ) = plt.subplots(1, 2, figsize=(11, 4))
    keys = ("speaker_purity", "speaker_nmi", "speaker_normalized_mi", "normalized_entropy")
    width = 0.8 / max(len(label_runs), 1)
    for i, (name, run) in enumerate(label_runs.items()):
        summary = label_summary(run.report)
        values = [summary.get(k) or 0.0 for k in keys]
        ax_bar.bar(np.arange(len(keys)) + i * width, values, width, label=name)
        occupancy = os.path.join(run.folder, "report", "occupancy.json")
        if os.path.isfile(occupancy):
            with open(occupancy, encoding="utf-8") as handle:
                counts = np.sort(np.asarray(json.load(handle)["counts"], dtype=float))[::-1]
            ax_occ.plot(counts / max(counts.sum(), 1.0), label=name)
    ax_bar.set_xticks(np.arange(len(keys)) + width * (len(label_runs) - 1) / 2)
    ax_bar.set_xticklabels(["purity", "NMI", "I/H(spk)", "H/log k"], fontsize=8)
    ax_bar.set_title("cluster ids vs training speakers")
    ax_bar.legend()
    ax_occ.set_xlabel("cluster (sorted by size)"), ax_occ.set_ylabel("share of frames")
    ax_occ.set_title("occupancy")
    ax_occ.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


# =============================================================================================
# The whole experiment
# =============================================================================================


def _environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.is_available(),
    }


def run_replication(
    plan: ReplicationPlan,
    command: str | None = None,
    stage_hook: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every stage of ``plan`` (completed stages in ``plan.output`` are reused) and write
    ``results.json``, ``results.md`` and the plots to ``plan.results_dir``; returns the results."""
    from tqdm.auto import tqdm

    started = time.time()
    timings: dict[str, float] = {}
    environment = _environment()

    def timed(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        if stage_hook is not None:
            stage_hook(stage)
        t0 = time.time()
        value = fn(*args)
        timings[stage] = round(time.time() - t0, 1)
        logger.info("stage %s: %.1f s", stage, timings[stage])
        return value

    os.makedirs(plan.output, exist_ok=True)
    atomic_write_json(os.path.join(plan.output, "plan.json"), plan.to_dict(), sort_keys=False)
    n_stages = 1 + len({v.labels for v in plan.variants}) + len(plan.variants) * len(plan.seeds) * 2 + 3
    bar = tqdm(total=n_stages, desc="replicate", disable=not plan.progress)

    teacher = timed("teacher", prepare_teacher, plan)
    bar.update()
    label_runs: dict[str, LabelRun] = {}
    for label_set in [s for s in LABEL_SETS if any(v.labels == s for v in plan.variants)]:
        label_runs[label_set] = timed(f"labels/{label_set}", prepare_labels, plan, label_set, teacher)
        bar.update()

    models: dict[str, list[tuple[int, str]]] = {}
    jobs = [(variant, seed) for variant in plan.variants for seed in plan.seeds]
    if plan.parallel > 1:  # subprocesses: threads only wait for them
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(plan.parallel) as pool:
            finals = list(
                pool.map(
                    lambda job: timed(
                        f"pretrain/{job[0].name}/seed{job[1]}",
                        pretrain,
                        plan,
                        *job,
                        label_runs[job[0].labels],
                    ),
                    jobs,
                )
            )
    else:
        finals = []
        for variant, seed in jobs:
            stage = f"pretrain/{variant.name}/seed{seed}"
            finals.append(timed(stage, pretrain, plan, variant, seed, label_runs[variant.labels]))
            bar.update()
    for (variant, seed), final in zip(jobs, finals):
        models.setdefault(variant.name, []).append((seed, final))

    references = {
        "mfcc_mean": [(EVAL_SEED, "mfcc")],
        "random_init": [(s, random_init_model(plan, next(iter(label_runs.values())), s)) for s in plan.seeds],
        "teacher": [(EVAL_SEED, teacher)],
    }
    per_seed: dict[str, list[dict[str, Any]]] = {}
    layers: dict[str, list[list[tuple[str, float]]]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    det_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    evaluations = {}
    if plan.parallel > 1:  # worker processes (spawned: each has its own torch/CUDA state and RNGs)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(plan.parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {}
            for name, entries in {**models, **references}.items():
                for seed, model in entries:
                    tag = f"{name}-seed{seed}" if name in models or name == "random_init" else name
                    futures[tag] = (time.time(), pool.submit(evaluate, plan, tag, model))
            for tag, (t0, future) in futures.items():
                evaluations[tag] = future.result()
                timings[f"eval/{tag}"] = round(time.time() - t0, 1)
    for name, entries in {**models, **references}.items():
        for seed, model in entries:
            tag = f"{name}-seed{seed}" if name in models or name == "random_init" else name
            if tag in evaluations:
                results = evaluations[tag]
            else:
                results = timed(f"eval/{tag}", evaluate, plan, tag, model)
            metrics = headline_metrics(results)
            per_seed.setdefault(name, []).append(metrics)
            layers.setdefault(name, []).append(per_layer_eer(results))
            failed = {
                t: e["error"]
                for t, e in results.get("tasks", {}).items()
                if isinstance(e, dict) and "error" in e
            }
            runs.setdefault(name, []).append(
                {
                    "seed": seed,
                    "model": os.path.relpath(model, plan.output) if os.path.exists(model) else model,
                    "metrics": metrics,
                    "best_layer": results.get("tasks", {}).get("verification", {}).get("best_layer_name"),
                    "per_layer_eer": dict(per_layer_eer(results)),
                    "failed_tasks": failed,
                    "eval_dir": os.path.relpath(os.path.join(plan.output, "eval", tag), plan.output),
                }
            )
            if seed == plan.seeds[0] or name in ("mfcc_mean", "teacher"):
                for label, curve in load_curves(os.path.join(plan.output, "eval", tag)).items():
                    if label.endswith("(last)"):
                        det_curves[f"{name} (last layer)"] = curve
            if len(entries) == 1 or seed == entries[-1][0]:
                bar.update()
    bar.close()

    summary = summarise(per_seed)
    seeds_of = {name: len(v) for name, v in per_seed.items()}
    first = next(iter(runs.values()))[0]
    eval_counts = {}
    any_results_path = os.path.join(plan.output, first["eval_dir"], "results.json")
    if os.path.isfile(any_results_path):
        with open(any_results_path, encoding="utf-8") as handle:
            full = json.load(handle)
        v = full.get("tasks", {}).get("verification", {})
        eval_counts = {
            "verification_trials": {"target": v.get("n_target"), "nontarget": v.get("n_nontarget")},
            "verification_speakers": v.get("n_speakers"),
            "verification_utterances": v.get("n_utterances"),
            "speaker_split": full.get("speaker_split"),
            "counting_test_mixtures": full.get("tasks", {}).get("counting", {}).get("n_test"),
            "diarization_mixtures": full.get("tasks", {}).get("diarization", {}).get("n_files"),
        }

    os.makedirs(plan.results_dir, exist_ok=True)
    plots = {
        "det": os.path.basename(
            plot_det(
                det_curves,
                os.path.join(plan.results_dir, "det_zero_shot.png"),
                "Zero-shot verification, last layer (held-out speakers)",
            )
        )
        if det_curves
        else None,
        "eer_per_layer": os.path.basename(
            plot_eer_per_layer(layers, os.path.join(plan.results_dir, "eer_per_layer.png"))
        ),
        "cluster_diagnostics": os.path.basename(
            plot_cluster_diagnostics(label_runs, os.path.join(plan.results_dir, "cluster_diagnostics.png"))
        ),
    }
    metric_files = {
        f"{v.name}-seed{s}": os.path.join(plan.output, "pretrain", f"{v.name}-seed{s}", "metrics.jsonl")
        for v in plan.variants
        for s in plan.seeds
    }
    loss_plot = plot_loss_curves(metric_files, os.path.join(plan.results_dir, "loss_curves.png"))
    plots["loss_curves"] = os.path.basename(loss_plot) if loss_plot else None

    wall = round(time.time() - started, 1)
    results = {
        "experiment": "small-scale replication: ReDimNet (speaker) labels vs MFCC (content) labels",
        "mode": plan.mode,
        "command": command,
        "wall_seconds": wall,
        "stage_seconds": timings,
        "environment": environment,
        "plan": {**plan.to_dict(), "output": plan.output, "results_dir": plan.results_dir},
        "eval_seed": EVAL_SEED,
        "eval_counts": eval_counts,
        "labels": {name: label_summary(run.report) for name, run in label_runs.items()},
        "summary": summary,
        "runs": runs,
        "verdict": verdict(summary),
        "plots": plots,
    }
    atomic_write_json(os.path.join(plan.results_dir, "results.json"), results, sort_keys=False)
    atomic_write_text(os.path.join(plan.results_dir, "results.md"), results_markdown(results, seeds_of))
    return results


def results_markdown(results: dict[str, Any], seeds_of: dict[str, int] | None = None) -> str:
    """``results.md``: provenance, the table, the label diagnostics and the verdict."""
    plan = results["plan"]
    seeds_of = seeds_of or {name: len(r) for name, r in results["runs"].items()}
    counts = results.get("eval_counts", {})
    trials = counts.get("verification_trials", {})
    lines = [
        f"# Small-scale replication ({results['mode']} mode)",
        "",
        f"- command: `{results.get('command')}`",
        f"- wall time: {results['wall_seconds'] / 60:.1f} min on {results['environment'].get('cpu_count')} CPU cores "
        f"(load average at start {results['environment'].get('load_average_at_start')})",
        f"- pretraining: {plan['steps']} steps, seeds {list(plan['seeds'])}, config `{os.path.relpath(plan['base_config'], REPO)}`"
        f" (k = {plan['k']}), training split of `{os.path.relpath(plan['data'], REPO)}` only",
        f"- evaluation: held-out speakers, eval seed {results['eval_seed']}; zero-shot verification "
        f"{trials.get('target')} target / {trials.get('nontarget')} non-target trials over "
        f"{counts.get('verification_speakers')} speakers; counting {counts.get('counting_test_mixtures')} test mixtures; "
        f"diarization {counts.get('diarization_mixtures')} mixtures (oracle SAD, collar 0, overlap scored)",
        "- cells: mean ± sample std over pretraining seeds (no ± = one seed); best layer is picked on the test "
        "trials (optimistic)",
        "",
        results_table(results["summary"], seeds_of).rstrip(),
        "",
        *[f"- **{v['name']}** ({v['labels']} labels): {v['description']}" for v in plan.get("variants", [])],
        "- references without pretraining: **mfcc_mean** (time-mean of 39-d MFCC), **random_init** (the "
        "same encoder, untrained), **teacher** (the ReDimNet's own embedding)",
        "",
        f"**{results['verdict']}**",
        "",
        "Gaps in EER points to each reference (+ = the model is better), against twice the larger seed std:",
        "",
        comparison_table(results["summary"]).rstrip() or "(no teacher-informed model measured)",
        "",
        "## Label diagnostics (training split, vs training speakers)",
        "",
        "| label set | k | used | perplexity | speaker purity | speaker NMI | I/H(speaker) | clusters/speaker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in results["labels"].items():

        def f(x: Any) -> str:
            return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

        lines.append(
            f"| {name} | {d['k']} | {d['used_clusters']} | {f(d['perplexity'])} | {f(d['speaker_purity'])} | "
            f"{f(d['speaker_nmi'])} | {f(d['speaker_normalized_mi'])} | {f(d['per_speaker_clusters_used_mean'])} |"
        )
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in results["plots"].values() if p), ""]
    return "\n".join(lines)
