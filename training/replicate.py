#!/usr/bin/env python
"""Small-scale replication: does speaker-aware labelling (DELULU) beat content labelling (MFCC)?

    python training/replicate.py --quick                 # one seed, few steps: a pipeline check
    python training/replicate.py                         # full mode: 3 seeds, 1600 steps
    python training/replicate.py --seeds 0,1,2,3,4 --steps 3000 --output runs/rep5 --results-dir results/rep5
    python training/replicate.py --retrain-teacher       # retrain the ReDimNet teacher first

Teacher -> ReDimNet and MFCC k-means labels (training speakers only) -> DELULU, DELULU lambda=0 and the
MFCC-label control pretrained with identical configs, steps and seeds -> evaluation on held-out
speakers with the MFCC mean, a random encoder and the teacher as references. Every model, the
teacher and the centroids stay in ``--output``; the table and plots go to ``--results-dir``. A rerun
with the same ``--output`` reuses finished stages. The logic is ``delulu_hf.replication``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from delulu_hf.replication import make_plan, run_replication


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, few steps (<= ~10 min on 2 idle cores)")
    p.add_argument(
        "--output", default="runs/replicate", help="run folder: teacher, labels, models, evaluations"
    )
    p.add_argument("--results-dir", default="results/small_scale", help="results.json, results.md, plots")
    p.add_argument(
        "--retrain-teacher", action="store_true", help="train the ReDimNet teacher instead of copying it"
    )
    p.add_argument(
        "--seeds", default=None, help="comma-separated pretraining seeds (default 0,1,2; quick: 0)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="pretraining steps per model (default 1600; quick: 20)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
    plan = make_plan(
        quick=args.quick,
        seeds=seeds,
        steps=args.steps,
        output=args.output,
        results_dir=args.results_dir,
        retrain_teacher=args.retrain_teacher,
        progress=not args.no_progress,
    )
    command = shlex.join(["python", "training/replicate.py", *(sys.argv[1:] if argv is None else argv)])
    results = run_replication(plan, command=command)
    print(f"results: {args.results_dir}/results.json, {args.results_dir}/results.md")
    print(results["verdict"])
    print(f"wall time: {results['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
