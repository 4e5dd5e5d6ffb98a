"""A single-GPU rehearsal of the 4xH100 recipe, shrunk in steps only (<= 8 minutes on one H200).

    bash benchmarks/gpu_rehearsal.sh                 # on a CUDA machine (checks for a GPU first)
    python benchmarks/gpu_rehearsal.py --tiny        # a CPU dry run of the rehearsal itself

``training/configs/base_4xh100.yaml`` as is (DELULU Base, bf16, 175 s of audio per micro-batch x 4
accumulation steps, HuBERT's stabilisers, update-level loss normalisation), except: the demo corpus,
labels made in-process by the committed demo teacher on the GPU (k-means with 3 restarts on a
15-minute subset), ``--steps`` updates with a 2-update warmup, a checkpoint every ``--steps / 2``.
Two runs on the same data:

* **straight**: ``--steps`` updates in one go;
* **resumed**: ``--steps / 2`` updates, the process exits, then the same command with ``--steps``
  resumes from the checkpoint and finishes.

Checks: every logged loss is finite, the resumed run logs the same losses as the straight run for the
second half (max relative difference; GPU kernels are not bitwise deterministic, so this is a
tolerance, not equality), both final models load with ``AutoModel`` and agree (max abs difference of
their weights). Everything goes under ``$OUT/rehearsal`` (or ``--work_dir``). Ends with RESULT lines:
``gpu_rehearsal_finite_losses`` (1/0), ``gpu_rehearsal_resume_max_rel_loss_diff``,
``gpu_rehearsal_final_weight_max_abs_diff``, ``gpu_rehearsal_seconds_per_update``,
``gpu_rehearsal_first_run_seconds`` (labels + the straight run) and ``gpu_rehearsal_wall_seconds``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "conv_dim": "[32, 32, 32, 32, 32, 32, 32]",
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "final_dim": 32,
    "num_clusters": 32,
}


def pretrain(out: str, steps: int, args: argparse.Namespace, labels: str) -> float:
    """Run training/pretrain.py to ``steps`` updates in ``out``; return its wall time."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    command += ["--num_machines", "1", "--dynamo_backend", "no"]
    command += ["--cpu", "--mixed_precision", "no"] if args.tiny else ["--mixed_precision", "bf16"]
    command += [os.path.join(REPO, "training", "pretrain.py"), "--config"]
    command += [os.path.join(REPO, "training", "configs", "base_4xh100.yaml")]
    command += ["--dataset", os.path.join(REPO, "data", "demo_corpus"), "--teacher"]
    command += [os.path.join(REPO, "data", "demo_teacher"), "--output_dir", out, "--label_cache_dir", labels]
    command += ["--max_steps", str(steps), "--save_steps", str(max(1, args.steps // 2))]
    command += ["--warmup_steps", "2", "--lr_decay_steps", str(args.steps), "--logging_steps", "1"]
    command += ["--label_fit_hours", "0.25", "--label_max_frames", "60000", "--label_kmeans_n_init", "3"]
    command += ["--report_to", "none", "--num_workers", str(args.num_workers)]
    if args.tiny:
        command += ["--max_batch_samples", "96000", "--max_sample_length", "48000"]
        command += ["--min_sample_length", "16000", "--mixed_precision", "no", "--label_fit_dtype", "float64"]
        for key, value in TINY_MODEL.items():
            command += [f"--model.{key}", str(value)]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, text=True, capture_output=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-8000:])
        raise SystemExit(f"pretrain.py failed (exit {result.returncode}) in {out}")
    return time.perf_counter() - start


def losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return {r["step"]: r["loss"] for r in map(json.loads, handle) if "loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="updates of the straight run (even)")
    parser.add_argument("--work_dir", default=None, help="default: $OUT/rehearsal or runs/gpu_rehearsal")
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="tiny model and batches on CPU (a dry run)")
    args = parser.parse_args()
    work = args.work_dir or os.path.join(os.environ.get("OUT", os.path.join(REPO, "runs")), "gpu_rehearsal")
    shutil.rmtree(work, ignore_errors=True)
    labels = os.path.join(work, "labels")
    started = time.perf_counter()

    straight_dir, resumed_dir = os.path.join(work, "straight"), os.path.join(work, "resumed")
    first = pretrain(straight_dir, args.steps, args, labels)  # also makes and caches the labels
    half = pretrain(resumed_dir, args.steps // 2, args, labels)
    rest = pretrain(resumed_dir, args.steps, args, labels)  # resumes from the half-way checkpoint

    straight, resumed = losses(straight_dir), losses(resumed_dir)
    finite = all(math.isfinite(v) for v in list(straight.values()) + list(resumed.values()))
    second_half = [s for s in straight if s > args.steps // 2]
    diffs = [
        abs(resumed[s] - straight[s]) / max(abs(straight[s]), 1e-12) for s in second_half if s in resumed
    ]
    if len(diffs) != len(second_half):
        raise SystemExit(f"the resumed run logged steps {sorted(resumed)}, expected {second_half}")

    import torch
    from transformers import AutoModel

    import delulu_hf  # noqa: F401  (registers DELULU with the Auto classes)

    finals = [AutoModel.from_pretrained(os.path.join(d, "final")) for d in (straight_dir, resumed_dir)]
    weight_diff = max(
        float((a - b).abs().max())
        for a, b in zip(finals[0].state_dict().values(), finals[1].state_dict().values())
    )
    with open(os.path.join(straight_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    # The steady per-update time: the resumed run's second half (labels cached), process start included.
    per_update = rest / max(1, args.steps - args.steps // 2)
    summary = {
        "straight_losses": straight,
        "resumed_losses": resumed,
        "max_rel_loss_diff": max(diffs),
        "final_weight_max_abs_diff": weight_diff,
        "seconds": {"straight": first, "resumed_first_half": half, "resumed_second_half": rest},
        "last_record": records[-1],
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    with open(os.path.join(work, "rehearsal.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(json.dumps(summary["last_record"]))
    print(f"RESULT gpu_rehearsal_finite_losses {int(finite)}")
    print(f"RESULT gpu_rehearsal_resume_max_rel_loss_diff {max(diffs):.2e}")
    print(f"RESULT gpu_rehearsal_final_weight_max_abs_diff {weight_diff:.2e}")
    print(f"RESULT gpu_rehearsal_seconds_per_update {per_update:.1f} s (incl. process start)")
    print(f"RESULT gpu_rehearsal_first_run_seconds {first:.0f} s (labels on the GPU + {args.steps} updates)")
    print(f"RESULT gpu_rehearsal_wall_seconds {time.perf_counter() - started:.0f} s")
    if not finite:
        raise SystemExit("non-finite losses in the rehearsal")


if __name__ == "__main__":
    main()
