"""Reliability of ``training/pretrain.py`` end to end, in subprocesses, on a tiny config (CPU).

* A run SIGKILLed mid-checkpoint and then mid-training resumes each time from the last complete
  checkpoint, and its whole loss trajectory (and final weights) equal an uninterrupted run's exactly.
* Two CPU processes (gloo DDP) give the single-process losses (2 x 1 micro-batches = 1 x 2).
* The default config (demo corpus, demo teacher, labels made on the fly) runs with ``--max_steps``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from audio_fixtures import synthetic_voice
from safetensors.torch import load_file

from delulu_hf import DeluluConfig, feat_extract_output_lengths
from delulu_hf import pretraining as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "pretrain.py")
# pretrain.py's main(), SIGKILLed right before the checkpoint folder of a given step is renamed into place.
KILLED_IN_CHECKPOINT = os.path.join(REPO, "tests", "fault_injection", "pretrain_killed_in_checkpoint.py")
MAX_STEPS = 24
TINY_MODEL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=[32] * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    num_clusters=8,
    final_dim=16,
    mask_time_length=4,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    feat_proj_dropout=0.0,
    layerdrop=0.0,
    denoise_corruption_prob=0.5,
)


def env() -> dict[str, str]:
    # One thread per process: exact reproducibility does not depend on it, but the shared CI cores do.
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_DATASETS_OFFLINE="1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A labelled dataset (audio + cluster_ids, save_to_disk) and a tiny run config."""
    import datasets

    root = tmp_path_factory.mktemp("tiny")
    config = DeluluConfig(**TINY_MODEL)
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {"audio": [], "cluster_ids": [], "file_name": []}
    for i in range(24):
        speaker = i % 4
        wave = synthetic_voice(speaker, rng.uniform(0.7, 1.6), rng, text_seed=i)
        frames = feat_extract_output_lengths(config, len(wave))
        rows["audio"].append({"array": wave, "sampling_rate": 16000})
        # learnable targets: speaker and a slow within-utterance pattern
        rows["cluster_ids"].append([(2 * speaker + (t // 8) % 2) % 8 for t in range(frames)])
        rows["file_name"].append(f"utt{i:02d}.flac")
    datasets.Dataset.from_dict(rows).save_to_disk(str(root / "data"))
    run = {
        "dataset": str(root / "data"),
        "dataset_split": None,
        "max_steps": MAX_STEPS,
        "max_batch_samples": 48000,
        "max_sample_length": 24000,
        "min_sample_length": 8000,
        "warmup_steps": 4,
        "learning_rate": 2.0e-3,
        "gradient_accumulation_steps": 2,
        "logging_steps": 1,
        "save_steps": 4,
        "save_total_limit": 2,
        "report_to": "none",
        "model": TINY_MODEL,
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(run))
    return {"root": str(root), "config": str(root / "tiny.yaml")}


def pretrain(
    config: str,
    output_dir: str,
    *args: str,
    launcher: list[str] | None = None,
    script: str = SCRIPT,
    **extra_env: str,
):
    command = (launcher or [sys.executable]) + [script, "--config", config, "--output_dir", output_dir, *args]
    return subprocess.run(command, env=dict(env(), **extra_env), capture_output=True, text=True, timeout=300)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], env=env(), capture_output=True, text=True, timeout=120, cwd=REPO
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--max_steps", "abc"], ["--max_steps", "'abc'"]),
        (["--max_steps", "-1"], ["max_steps must be >= 1", "-1"]),
        (["--learning_rat", "1e-3"], ["unknown option --learning_rat", "--learning_rate"]),
    ],
)
def test_user_errors_print_one_line_and_exit_2(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("pretrain.py: error: ")
    for text in expected:
        assert text in lines[0]


def test_help_lists_the_default_config_values():
    with open(os.path.join(REPO, "training", "configs", "demo.yaml")) as handle:
        demo = yaml.safe_load(handle)
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    # the --max_steps entry: from its flag to the next flag, re-joined over argparse's line wrapping
    entry = result.stdout.split("--max_steps MAX_STEPS", 2)[2].split("\n  --", 1)[0]
    assert f"(default: {demo['max_steps']})" in " ".join(entry.split())
    assert demo["max_steps"] != P.PretrainConfig().max_steps, "the file's value, not the dataclass default"


def losses(output_dir: str) -> dict[int, float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), "metrics.jsonl holds one trajectory (cut back on resume)"
    return {r["step"]: r["loss"] for r in records}


def last_logged_step(path: str) -> int:
    """The newest step in a metrics file being written by another process (a torn last line is skipped)."""
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


@pytest.fixture(scope="module")
def reference(tiny) -> str:
    """The uninterrupted single-process run (2 micro-batches per update)."""
    out = os.path.join(tiny["root"], "reference")
    result = pretrain(tiny["config"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"saved to {os.path.abspath(os.path.join(out, 'final'))}" in result.stdout
    return out


def test_sigkill_mid_checkpoint_and_mid_training_resume_exactly(tiny, reference):
    out = os.path.join(tiny["root"], "killed")
    ckpts = os.path.join(out, "checkpoints")

    # 1. Killed while writing the step-8 checkpoint: the state files exist, the rename never happened.
    first = pretrain(tiny["config"], out, "--kill_in_checkpoint_at_step", "8", script=KILLED_IN_CHECKPOINT)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert sorted(os.listdir(ckpts)) == [".tmp-step_00000008", "step_00000004"]
    assert os.path.isfile(os.path.join(ckpts, ".tmp-step_00000008", "model.safetensors"))

    # 2. Resumes from step 4 (the incomplete folder is ignored and removed); killed from outside
    #    once it has logged step 10, i.e. in the middle of training.
    command = [sys.executable, SCRIPT, "--config", tiny["config"], "--output_dir", out]
    second = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    metrics = os.path.join(out, "metrics.jsonl")
    while time.monotonic() < deadline and second.poll() is None:
        if last_logged_step(metrics) >= 10:
            second.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    _, stderr = second.communicate(timeout=60)
    assert second.returncode == -signal.SIGKILL, "the run should still have been going at step 10"
    assert "Resumed from" in stderr and "step_00000004" in stderr
    assert not os.path.exists(os.path.join(ckpts, ".tmp-step_00000008"))
    done = [int(name.split("_")[1]) for name in os.listdir(ckpts) if name.startswith("step_")]
    assert max(done) >= 8

    # 3. Resumes from the newest complete checkpoint and finishes.
    third = pretrain(tiny["config"], out)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"step_{max(done):08d}" in third.stderr

    # The resumed trajectory equals the uninterrupted one exactly, step by step, and so do the weights.
    expected, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    assert got == expected
    final_expected = load_file(os.path.join(reference, "final", "model.safetensors"))
    final_got = load_file(os.path.join(out, "final", "model.safetensors"))
    assert final_got.keys() == final_expected.keys()
    for key in final_expected:
        torch.testing.assert_close(final_got[key], final_expected[key], rtol=0, atol=0)
    kept = sorted(name for name in os.listdir(ckpts))
    assert kept == [f"step_{MAX_STEPS - 4:08d}", f"step_{MAX_STEPS:08d}"], "save_total_limit=2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_match_one(tiny, reference):
    out = os.path.join(tiny["root"], "two_processes")
    # accelerate's torchrun launcher; on a machine without GPUs pretrain.py runs gloo DDP on CPU.
    # (`accelerate launch --cpu --num_processes 2` would start a single process without MPI.)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(free_port())]
    result = pretrain(tiny["config"], out, "--gradient_accumulation_steps", "1", launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    # 2 processes x 1 micro-batch see the global batches 1 process x 2 micro-batches sees.
    expected, got = losses(reference), losses(out)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-4)
    with open(os.path.join(out, "checkpoints", f"step_{MAX_STEPS:08d}", "trainer_state.json")) as handle:
        assert json.load(handle)["num_processes"] == 2
    assert os.path.isfile(os.path.join(out, "checkpoints", f"step_{MAX_STEPS:08d}", "random_states_1.pkl"))


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(REPO, "data", "demo_teacher", "config.json")),
    reason="the demo teacher (data/demo_teacher) is not in this checkout yet",
)
def test_default_config_runs_with_few_steps(tmp_path):
    """`accelerate launch training/pretrain.py` with the shipped demo.yaml, cut to a few steps and items."""
    import delulu_hf

    out = str(tmp_path / "demo")
    args = ["--max_steps", "2", "--max_train_items", "24", "--label_cache_dir", str(tmp_path / "labels")]
    args += ["--save_steps", "1", "--logging_steps", "1", "--label_fit_hours", "null"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT]
    result = subprocess.run(
        command + ["--output_dir", out, *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = os.path.join(out, "final")
    assert f"saved to {os.path.abspath(final)}" in result.stdout
    assert sorted(losses(out)) == [1, 2]
    model = delulu_hf.DeluluForPreTraining.from_pretrained(final)
    teacher_config = json.load(open(os.path.join(REPO, "data", "demo_teacher", "config.json")))
    assert model.config.num_clusters == 100 and model.config.hidden_size == 192
    assert model.config.label_feature_dim is not None and model.config.label_teacher_name
    assert model.config.auto_map["AutoModel"] == "modeling_delulu.DeluluModel"
    for name in ("kmeans_centroids.safetensors", "kmeans_centroids.json", "preprocessor_config.json"):
        assert os.path.isfile(os.path.join(final, name)), name
    provenance = json.load(open(os.path.join(final, "kmeans_centroids.json")))
    assert provenance["k"] == 100 and provenance["teacher"]["name"] == model.config.label_teacher_name
    assert teacher_config  # the teacher folder is a real save_pretrained folder
    assert os.path.isfile(os.path.join(out, "loss_curves.png"))


def test_nonfinite_updates_are_skipped_counted_and_abort_the_run(tiny):
    """A diverging run (absurd learning rate) skips its NaN updates, then stops with a clear error."""
    out = os.path.join(tiny["root"], "diverged")
    args = ["--learning_rate", "1e30", "--warmup_steps", "1", "--max_consecutive_nonfinite", "3"]
    result = pretrain(tiny["config"], out, *args, "--gradient_accumulation_steps", "1", "--save_steps", "100")
    assert result.returncode != 0
    assert "NonFiniteLossError: 3 optimizer steps in a row" in result.stderr
    assert "update skipped (1 in a row, 1 in total)" in result.stderr
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    skipped = [r["nonfinite_skipped"] for r in records]
    assert skipped[0] == 0 and skipped[-1] == 2 and skipped == sorted(skipped)
    assert np.isfinite(records[0]["loss"]) and np.isnan(records[-1]["loss"])
