"""A rehearsal of the real path, as a person with their own corpus walks it (issue 14), on 2 CPU processes.

A user-style audiofolder (demo-corpus recordings re-encoded as WAV and FLAC at 8, 16 and 44.1 kHz, one
stereo, plus a corrupt, an empty and a 0.01 s file) goes through

    prepare_labels.py --on_error skip --output OUT
    -> accelerate launch --multi_gpu --num_processes 2 pretrain.py --config base_4xh100.yaml --dataset OUT
       --on_error skip --audio_decoding on-the-fly (the Base config shrunk with --model.* flags)
    -> SIGKILL from outside mid-training -> the same command again (resumes)
    -> evaluate.py -> push_to_hub.py --dry_run

and the test checks what the person would: the skipped items are exactly the salted files, the saved
config and the model card name the teacher, dimension and k that made the labels, the resumed run redoes
the killed run's last steps exactly, and the pushed folder loads as remote code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from audio_fixtures import SALTED_FILES, write_user_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING = os.path.join(REPO, "training")
TEACHER = os.path.join(REPO, "data", "demo_teacher")
K = 16
SHRINK = {  # Base (training/configs/base_4xh100.yaml) cut to a CPU-sized network; the conv stack stays
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [32] * 7,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "final_dim": 16,
}
MAX_STEPS, SAVE_STEPS, KILL_AFTER = 10, 3, 4  # killed once step 4 is logged: it resumes from step 3

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(TEACHER, "config.json")),
    reason="needs the demo teacher (data/demo_teacher)",
)


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_DATASETS_OFFLINE="1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{command[:3]}...\n{result.stderr[-4000:]}"
    return result


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, as a lost machine would (torchrun starts its workers in
    sessions of their own, so killing the launcher's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def metrics(output_dir: str) -> dict[int, dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    records = {}
    for line in open(path).read().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        records[record["step"]] = record
    return records


def test_own_corpus_from_labels_to_hub(tmp_path):
    corpus = write_user_corpus(tmp_path / "my_corpus", os.path.join(REPO, "data", "demo_corpus"))
    out, run_dir = str(tmp_path / "labels"), str(tmp_path / "run")

    # 1. Labels: the salted files are left out and listed; everything else is labelled.
    run(
        [
            sys.executable,
            os.path.join(TRAINING, "prepare_labels.py"),
            "--data",
            str(corpus),
            "--teacher",
            TEACHER,
        ]
        + ["--k", str(K), "--max_frames", "20000", "--n_init", "1", "--on_error", "skip", "--output", out]
        + ["--audio_decoding", "on-the-fly"]
    )
    manifest = json.load(open(os.path.join(out, "labels.json")))
    assert sorted(item["name"] for item in manifest["skipped"]) == sorted(SALTED_FILES)
    teacher, dim = manifest["label_teacher_name"], manifest["label_feature_dim"]
    assert (manifest["num_clusters"], dim) == (K, 600)

    # 2. Pretraining on OUT as written, 2 processes, on-the-fly decoding; killed from outside mid-run.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    pretrain = [
        os.path.join(TRAINING, "pretrain.py"),
        "--config",
        os.path.join(TRAINING, "configs", "base_4xh100.yaml"),
    ]
    pretrain += [
        "--dataset",
        out,
        "--output_dir",
        run_dir,
        "--on_error",
        "skip",
        "--audio_decoding",
        "on-the-fly",
    ]
    pretrain += [f"--model.{key}={json.dumps(value)}" for key, value in SHRINK.items()]
    pretrain += [
        "--mixed_precision",
        "no",
        "--num_workers",
        "0",
        "--report_to",
        "none",
        "--max_steps",
        str(MAX_STEPS),
    ]
    pretrain += [
        "--warmup_steps",
        "2",
        "--lr_decay_steps",
        str(MAX_STEPS),
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
    ]
    pretrain += [
        "--max_batch_samples",
        "96000",
        "--max_sample_length",
        "48000",
        "--min_sample_length",
        "8000",
    ]
    pretrain += ["--gradient_accumulation_steps", "1"]
    first = subprocess.Popen(
        launcher + ["--main_process_port", str(free_port())] + pretrain,
        env=env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while (
        time.monotonic() < deadline and first.poll() is None and max(metrics(run_dir), default=0) < KILL_AFTER
    ):
        time.sleep(0.05)
    assert first.poll() is None, "the run should still have been going"
    kill_tree(first.pid)
    _, stderr = first.communicate(timeout=60)
    before = metrics(run_dir)
    assert f"model.num_clusters = {K} from the labels in {out} (the config's 256 yields)" in stderr

    second = run(launcher + ["--main_process_port", str(free_port())] + pretrain)
    assert "Resumed from" in second.stderr
    after = metrics(run_dir)
    assert sorted(after) == list(range(1, MAX_STEPS + 1))
    redone = [step for step in before if step > int(second.stderr.split("(step ", 1)[1].split(",")[0])]
    assert redone, "the steps the killed run made after its last checkpoint are made again"
    for step in before:  # the resumed run saw exactly the batches the killed run saw
        assert after[step]["loss"] == before[step]["loss"], step
    assert after[MAX_STEPS]["items_skipped"] == len(SALTED_FILES)

    final = os.path.join(run_dir, "final")
    config = json.load(open(os.path.join(final, "config.json")))
    assert (config["num_clusters"], config["label_teacher_name"], config["label_feature_dim"]) == (
        K,
        teacher,
        dim,
    )
    assert config["hidden_size"] == SHRINK["hidden_size"]
    training = json.load(open(os.path.join(final, "training_config.json")))
    assert training["label_source"]["kind"] == "labelled-corpus"
    assert training["skipped_items"]["total"] == training["skipped_items"]["labelling"] == len(SALTED_FILES)
    assert {item["name"] for item in training["skipped_items"]["items"]} == set(SALTED_FILES)
    provenance = json.load(open(os.path.join(final, "kmeans_centroids.json")))
    assert (provenance["k"], provenance["feature_dim"], provenance["teacher"]["name"]) == (K, dim, teacher)

    # 3. Evaluation, then the Hub folder (built and verified in a fresh process without delulu_hf).
    # evaluate.py has no skip option (it stops on the corrupt file, naming it): evaluate on the clean files.
    clean = tmp_path / "my_corpus_clean"
    shutil.copytree(corpus / "audio", clean / "audio")
    rows = (corpus / "metadata.csv").read_text().splitlines()
    (clean / "metadata.csv").write_text("\n".join(r for r in rows if not r.startswith("salted/")) + "\n")
    evaluation = str(tmp_path / "eval")
    run(
        [sys.executable, os.path.join(TRAINING, "evaluate.py"), "--model", final, "--data", str(clean)]
        + ["--tasks", "verification", "--output", evaluation, "--no_progress"]
    )
    hub = str(tmp_path / "hub")
    pushed = run(
        [
            sys.executable,
            os.path.join(TRAINING, "push_to_hub.py"),
            "--checkpoint",
            final,
            "--repo_id",
            "me/own-delulu",
        ]
        + ["--results", os.path.join(evaluation, "results.json"), "--dry_run", "--output_dir", hub]
    )
    assert f"verified {hub}: loads without delulu_hf" in pushed.stdout
    card = open(os.path.join(hub, "README.md")).read()
    assert f"(k = {K})" in card and f"`{teacher}` ({dim}-dim" in card
    assert "redimnet-b6" not in card and "2304" not in card
