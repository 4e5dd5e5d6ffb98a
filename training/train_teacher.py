#!/usr/bin/env python
"""Train a ReDimNet speaker teacher (AAM-softmax) on a speaker-labelled audio dataset.

Runs as ``python training/train_teacher.py ...`` or ``accelerate launch training/train_teacher.py ...``.
The dataset is anything ``delulu_hf.audio.load_audio_dataset`` reads (an audiofolder such as
``data/demo_corpus``, a saved dataset, a Hub id) with a speaker column. A rerun with the same
``--output-dir`` resumes from the newest checkpoint.

Example (the demo teacher; see data/demo_teacher/README.md for the exact command used):

    python training/train_teacher.py --data data/demo_corpus --trials data/demo_corpus/trials.csv \\
        --noise-dir data/demo_noise --preset b0 --max-steps 300 --output-dir runs/teacher-b0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from delulu_hf.teacher.training import TeacherTrainingConfig, train_teacher


def parse_args(argv: list[str] | None = None) -> TeacherTrainingConfig:
    defaults = TeacherTrainingConfig(data="", output_dir="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset path or Hub id with audio + speaker columns")
    p.add_argument("--output-dir", required=True, help="final model, official .pt, summary and loss plot")
    p.add_argument("--preset", default=defaults.preset, help="ReDimNet size: b0 ... b6")
    p.add_argument("--model-overrides", default="{}", help="JSON of ReDimNetConfig fields, e.g. '{\"C\": 8}'")
    p.add_argument("--train-split", default=defaults.train_split)
    p.add_argument("--speaker-column", default=defaults.speaker_column)
    p.add_argument("--eval-split", default=defaults.eval_split, help="split holding the trial files")
    p.add_argument("--trials", default=None, help="CSV enroll_file,test_file,target for the held-out EER")
    p.add_argument("--noise-dir", default=None, help="folder of noise recordings for augmentation")
    p.add_argument("--checkpoint-dir", default=None, help="default: <output-dir>/checkpoints")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--margin", type=float, default=defaults.margin)
    p.add_argument("--scale", type=float, default=defaults.scale)
    p.add_argument("--margin-warmup-fraction", type=float, default=defaults.margin_warmup_fraction)
    p.add_argument(
        "--crop-seconds", type=float, nargs=2, default=defaults.crop_seconds, metavar=("MIN", "MAX")
    )
    p.add_argument(
        "--speeds",
        type=float,
        nargs="+",
        default=defaults.speeds,
        help="e.g. 1.0 0.9 1.1: speed perturbation",
    )
    p.add_argument("--noise-prob", type=float, default=defaults.noise_prob)
    p.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    p.add_argument("--save-every", type=int, default=defaults.save_every)
    p.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads; 1 is often fastest on a shared CPU"
    )
    p.add_argument("--no-official", action="store_true", help="skip the official-layout .pt")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    args = p.parse_args(argv)
    try:
        overrides = json.loads(args.model_overrides)
    except json.JSONDecodeError as err:
        p.error(f"--model-overrides is not JSON: {err}")
    return TeacherTrainingConfig(
        data=args.data,
        output_dir=args.output_dir,
        preset=args.preset,
        model_overrides=overrides,
        train_split=args.train_split,
        speaker_column=args.speaker_column,
        eval_split=args.eval_split,
        trials=args.trials,
        noise_dir=args.noise_dir,
        checkpoint_dir=args.checkpoint_dir,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        margin=args.margin,
        scale=args.scale,
        margin_warmup_fraction=args.margin_warmup_fraction,
        crop_seconds=tuple(args.crop_seconds),
        speeds=tuple(args.speeds),
        noise_prob=args.noise_prob,
        grad_clip=args.grad_clip,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every,
        seed=args.seed,
        num_threads=args.threads,
        save_official=not args.no_official,
        resume=not args.no_resume,
    )


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = train_teacher(parse_args(argv))
    eer = summary.get("heldout_eer")
    print(
        f"steps {summary['steps']}  loss {summary['first_losses_mean']:.3f} -> {summary['last_losses_mean']:.3f}"
        + (f"  held-out EER {100 * eer:.2f}% ({summary['heldout_trials']} trials)" if eer is not None else "")
    )
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
