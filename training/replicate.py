#!/usr/bin/env python
"""Small-scale replication: does speaker-aware labelling (DELULU) beat content labelling (MFCC)?

    python training/replicate.py --quick                 # one seed, few steps: a pipeline check
    python training/replicate.py                         # full mode: 3 seeds, 1600 steps
    python training/replicate.py --seeds 0 1 2 3 4 --steps 3000 --output runs/rep5 --results_dir results/rep5
    python training/replicate.py --retrain_teacher       # retrain the ReDimNet teacher first

Teacher -> ReDimNet and MFCC k-means labels (training speakers only) -> DELULU, DELULU lambda=0 and the
MFCC-label control pretrained with identical configs, steps and seeds -> evaluation on held-out
speakers with the MFCC mean, a random encoder and the teacher as references. Every model, the
teacher and the centroids stay in ``--output``; the table and plots go to ``--results_dir``. A rerun
with the same ``--output`` reuses finished stages. The logic is ``training/replication.py``.
"""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import dataclass, field

from delulu_hf.cli import ArgumentParser, main_entry
from delulu_hf.errors import UserError


@dataclass
class ReplicateArguments:
    quick: bool = field(default=False, metadata={"help": "one seed, few steps (<= ~10 min on 2 idle cores)"})
    output: str = field(
        default="runs/replicate", metadata={"help": "run folder: teacher, labels, models, evaluations"}
    )
    results_dir: str = field(
        default="results/small_scale", metadata={"help": "results.json, results.md, plots"}
    )
    retrain_teacher: bool = field(
        default=False, metadata={"help": "train the ReDimNet teacher instead of copying it"}
    )
    seeds: list[str] | None = field(
        default=None,
        metadata={"help": "pretraining seeds, e.g. 0 1 2 (or the old 0,1,2); default 0 1 2, quick: 0"},
    )
    steps: int | None = field(
        default=None, metadata={"help": "pretraining steps per model (default 1600; quick: 20)"}
    )
    no_progress: bool = field(default=False, metadata={"help": "hide progress bars"})
    preset: str | None = field(
        default=None,
        metadata={
            "help": "'gpu': larger student, longer runs, 6 at a time (<= 8 min on one H200, estimated)"
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "with --preset gpu: 3 steps, one seed, to check the code path on a CPU"},
    )

    def __post_init__(self) -> None:
        if self.seeds is not None:
            items = [s.strip() for text in self.seeds for s in str(text).split(",") if s.strip()]
            bad = [s for s in items if not s.lstrip("-").isdigit()]
            if bad:
                raise ValueError(f"--seeds takes integers, got {' '.join(bad)}")
            self.seeds = items

    @property
    def seed_list(self) -> list[int] | None:
        return None if self.seeds is None else [int(s) for s in self.seeds]


def parse_args(argv: list[str] | None = None) -> ReplicateArguments:
    return ArgumentParser(ReplicateArguments, prog="replicate.py", description=__doc__).parse_one(argv)


def result_lines(results: dict) -> list[str]:
    """One ``RESULT`` line per model: mean (and std) of the decision metrics over seeds, for logs."""
    lines = []
    for model, stats in results["summary"].items():
        cells = []
        for key in ("eer_last", "eer_downstream", "eer_best"):
            s = stats.get(key, {})
            if s.get("mean") is not None:
                cells.append(
                    f"{key}={100 * s['mean']:.2f}" + (f"+-{100 * s['std']:.2f}" if s.get("std") else "")
                )
        lines.append(
            f"RESULT mode={results['mode']} model={model} seeds={stats['eer_last'].get('n', 0)} "
            + " ".join(cells)
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The experiment sits beside this script (training/ is sys.path[0] when it runs); imported only
    # now so `--help` and argument errors stay instant.
    from replication import make_plan, run_replication

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        plan = make_plan(
            quick=args.quick,
            seeds=args.seed_list,
            steps=args.steps,
            output=args.output,
            results_dir=args.results_dir,
            retrain_teacher=args.retrain_teacher,
            progress=not args.no_progress,
            preset=args.preset,
            dry_run=args.dry_run,
        )
    except ValueError as err:  # an empty --seeds, --steps 0: the plan's checks of the user's values
        raise UserError(str(err)) from err
    command = shlex.join(["python", "training/replicate.py", *(sys.argv[1:] if argv is None else argv)])
    results = run_replication(plan, command=command)
    print(f"results: {args.results_dir}/results.json, {args.results_dir}/results.md")
    for line in result_lines(results):
        print(line)
    print(results["verdict"])
    print(f"wall time: {results['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    main_entry(main)
