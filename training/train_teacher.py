#!/usr/bin/env python
"""Train a ReDimNet speaker teacher (AAM-softmax) on a speaker-labelled audio dataset.

Runs as ``python training/train_teacher.py ...`` or ``accelerate launch training/train_teacher.py ...``.
The dataset is anything ``delulu_hf.audio.load_audio_dataset`` reads (an audiofolder such as
``data/demo_corpus``, a saved dataset, a Hub id) with a speaker column. A rerun with the same
``--output_dir`` resumes from the newest checkpoint. Every option is a field of
``delulu_hf.teacher.training.TeacherTrainingConfig``; ``--model_overrides.C 8`` (or
``--model_overrides '{C: 8}'``) sets ReDimNetConfig fields.

Example (the demo teacher; see data/demo_teacher/README.md for the exact command used):

    python training/train_teacher.py --data data/demo_corpus --trials data/demo_corpus/trials.csv \\
        --noise_dir data/demo_noise --preset b0 --max_steps 300 --output_dir runs/teacher-b0
"""

from __future__ import annotations

import logging

from delulu_hf.cli import ArgumentParser, main_entry
from delulu_hf.teacher.training import TeacherTrainingConfig, train_teacher

# Flags whose name changed when the options became the config's fields.
RENAMED = {"--threads": "--num_threads", "--no-official": "--no_save_official"}


def parse_args(argv: list[str] | None = None) -> TeacherTrainingConfig:
    parser = ArgumentParser(
        TeacherTrainingConfig, prog="train_teacher.py", description=__doc__, renamed=RENAMED
    )
    return parser.parse_one(argv)


def main(argv: list[str] | None = None) -> dict:
    """Train and return the run's summary (what ``train_summary.json`` holds)."""
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = train_teacher(config)
    eer = summary.get("heldout_eer")
    print(
        f"steps {summary['steps']}  loss {summary['first_losses_mean']:.3f} -> {summary['last_losses_mean']:.3f}"
        + (f"  held-out EER {100 * eer:.2f}% ({summary['heldout_trials']} trials)" if eer is not None else "")
    )
    return summary


def _run() -> int:
    main()
    return 0


if __name__ == "__main__":
    main_entry(_run)
