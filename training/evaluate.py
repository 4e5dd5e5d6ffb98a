"""Evaluate a speech encoder on speaker tasks and write OUT/results.json, OUT/results.md and plots.

    python training/evaluate.py --model path/to/delulu --data data/demo_corpus \
        --mixtures data/demo_mixtures --tasks verification,identification,profiling,counting,diarization \
        --output runs/eval-delulu

``--model`` is a DELULU folder or Hub id, any transformers audio encoder (HuBERT, WavLM, ...), a
ReDimNet teacher (folder or official .pt), or ``mfcc`` (a baseline that needs no model). ``--data``
is an audiofolder whose ``metadata.csv`` has ``file_name, speaker_id`` (optional ``gender,
language, split``). Trials come from ``--trials``, else ``DATA/trials.csv``, else are generated
from the held-out speakers. The logic lives in ``delulu_hf.evaluation.tasks.run_evaluation``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from delulu_hf.evaluation.tasks import TASKS, run_evaluation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", required=True, help="DELULU folder/Hub id, transformers encoder, ReDimNet, or 'mfcc'"
    )
    p.add_argument("--data", required=True, help="audiofolder with metadata.csv (file_name, speaker_id, ...)")
    p.add_argument("--output", required=True, help="folder for results.json, results.md and plots")
    p.add_argument(
        "--tasks",
        default="verification,identification,profiling",
        help=f"comma-separated subset of {','.join(TASKS)}, or 'all'",
    )
    p.add_argument(
        "--trials", default=None, help="trials CSV (enroll_file,test_file,target); default DATA/trials.csv"
    )
    p.add_argument(
        "--mixtures", default=None, help="mixtures folder (metadata.csv with num_speakers, rttm_file)"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-seconds", type=float, default=60.0, help="padded audio per extraction batch (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="feature cache (default OUTPUT/cache)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow Hub models with custom code")
    p.add_argument(
        "--nontarget-ratio", type=float, default=1.0, help="non-target/target ratio of generated trials"
    )
    p.add_argument("--downstream-epochs", type=int, default=10)
    p.add_argument("--downstream-batch-size", type=int, default=32)
    p.add_argument("--downstream-crop-seconds", type=float, default=3.0)
    p.add_argument("--downstream-lr", type=float, default=1e-3)
    p.add_argument("--window-seconds", type=float, default=1.5, help="diarization window")
    p.add_argument("--window-hop-seconds", type=float, default=0.75, help="diarization window hop")
    p.add_argument("--mixtures-per-count", type=int, default=12, help="generated mixtures per speaker count")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tasks = list(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    results = run_evaluation(
        model=args.model,
        data=args.data,
        output=args.output,
        tasks=tasks,
        trials=args.trials,
        mixtures=args.mixtures,
        device=device,
        batch_seconds=args.batch_seconds,
        seed=args.seed,
        cache_dir=args.cache_dir,
        trust_remote_code=args.trust_remote_code,
        nontarget_ratio=args.nontarget_ratio,
        downstream_epochs=args.downstream_epochs,
        downstream_batch_size=args.downstream_batch_size,
        downstream_crop_seconds=args.downstream_crop_seconds,
        downstream_lr=args.downstream_lr,
        window_seconds=args.window_seconds,
        window_hop_seconds=args.window_hop_seconds,
        mixtures_per_count=args.mixtures_per_count,
        command=shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["evaluate.py", *argv]),
        progress=not args.no_progress,
    )
    failed = {name: entry["error"] for name, entry in results["tasks"].items() if "error" in entry}
    print(f"results: {args.output}/results.json, {args.output}/results.md")
    for name, error in failed.items():
        print(f"task {name} failed: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
