r"""Evaluate a speech encoder on speaker tasks and write OUT/results.json, OUT/results.md and plots.

    python training/evaluate.py --model path/to/delulu --data data/demo_corpus \
        --mixtures data/demo_mixtures --tasks verification,identification,profiling,counting,diarization \
        --output runs/eval-delulu

``--model`` is a DELULU folder or Hub id, any transformers audio encoder (HuBERT, WavLM, ...), a
ReDimNet teacher (folder or official .pt), or ``mfcc`` (a baseline that needs no model). ``--data``
is an audiofolder whose ``metadata.csv`` has ``file_name, speaker_id`` (optional ``gender,
language, split``). Trials come from ``--trials``, else ``DATA/trials.csv``, else are generated
from the held-out speakers. The logic lives in ``delulu_hf.evaluation.run_evaluation``.

Paths are checked before any model is loaded and before OUT is created, so a typo costs nothing
and leaves nothing behind (one line on stderr, exit code 2). The hyphenated flags of earlier
versions (``--batch-seconds``, ``--no-progress``, ...) still work, with a deprecation warning.
"""

# No ``from __future__ import annotations``: the options dataclass must build when this file is
# loaded by path (importlib.util.spec_from_file_location) without being put in ``sys.modules``.
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Optional

from delulu_hf.cli import ArgumentParser, UserError, main_entry, require_path
from delulu_hf.evaluation import TASKS, run_evaluation
from delulu_hf.evaluation.encoders import model_spec_problem


@dataclass
class EvaluateOptions:
    """Options of ``training/evaluate.py`` (one field per flag)."""

    model: str = field(metadata={"help": "DELULU folder/Hub id, transformers encoder, ReDimNet, or 'mfcc'"})
    data: str = field(metadata={"help": "audiofolder with metadata.csv (file_name, speaker_id, ...)"})
    output: str = field(metadata={"help": "folder for results.json, results.md and plots"})
    tasks: str = field(
        default="verification,identification,profiling",
        metadata={"help": f"comma-separated subset of {','.join(TASKS)}, or 'all'"},
    )
    trials: Optional[str] = field(
        default=None, metadata={"help": "trials CSV (enroll_file,test_file,target); default DATA/trials.csv"}
    )
    mixtures: Optional[str] = field(
        default=None, metadata={"help": "mixtures folder (metadata.csv with num_speakers, rttm_file)"}
    )
    device: Optional[str] = field(
        default=None, metadata={"help": "torch device (default: cuda if available, else cpu)"}
    )
    batch_seconds: float = field(default=60.0, metadata={"help": "padded audio per extraction batch (s)"})
    seed: int = field(default=0, metadata={"help": "seed of the speaker split, trials, probes and mixtures"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "feature cache (default OUTPUT/cache)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow Hub models with custom code"})
    nontarget_ratio: float = field(
        default=1.0, metadata={"help": "non-target/target ratio of generated trials"}
    )
    downstream_epochs: int = field(default=10, metadata={"help": "epochs of the x-vector head"})
    downstream_batch_size: int = field(default=32, metadata={"help": "batch size of the x-vector head"})
    downstream_crop_seconds: float = field(
        default=3.0, metadata={"help": "training crop of the x-vector head (s)"}
    )
    downstream_lr: float = field(default=1e-3, metadata={"help": "learning rate of the x-vector head"})
    window_seconds: float = field(default=1.5, metadata={"help": "diarization window (s)"})
    window_hop_seconds: float = field(default=0.75, metadata={"help": "diarization window hop (s)"})
    mixtures_per_count: int = field(default=12, metadata={"help": "generated mixtures per speaker count"})
    no_progress: bool = field(default=False, metadata={"help": "hide progress bars"})

    def __post_init__(self) -> None:
        tasks = self.task_list()
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(
                f"--tasks: unknown task(s) {unknown or [self.tasks]}; choose from {','.join(TASKS)}"
            )
        if self.batch_seconds <= 0:
            raise ValueError(f"--batch_seconds must be positive, got {self.batch_seconds}")

    def task_list(self) -> list[str]:
        if self.tasks.strip() == "all":
            return list(TASKS)
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


def _looks_local(model: str) -> bool:
    """True when ``--model`` names a file or folder rather than ``mfcc`` or a Hub id.

    A Hub id is ``name`` or ``owner/name``; anything that exists, starts like a path (``/``, ``.``),
    is not a valid repo id (e.g. has more than one ``/``) or ends in ``.pt`` is a path. A missing
    ``owner/name`` folder cannot be told from a Hub id; loading it reports the error.
    """
    if model.lower() == "mfcc":
        return False
    if os.path.exists(model) or model.startswith(("/", ".")) or model.endswith(".pt"):
        return True
    if os.sep != "/" and os.sep in model:
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return True
    return False


def check_paths(options: EvaluateOptions) -> None:
    """Raise a ``UserError`` for a path that does not exist or a ``--model`` folder that is not a
    model (before any model is loaded or folder created)."""
    require_path(options.data, "--data", "dir")
    require_path(options.trials, "--trials", "file")
    require_path(options.mixtures, "--mixtures", "dir")
    if _looks_local(options.model):
        require_path(options.model, "--model", "any")
        problem = model_spec_problem(options.model, options.trust_remote_code)
        if problem is not None:
            raise UserError(f"--model {options.model}: {problem}")
    if os.path.isfile(options.output):
        raise UserError(f"--output {options.output}: is a file, expected a folder")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(EvaluateOptions, prog="evaluate.py", description=__doc__)
    options: EvaluateOptions = parser.parse_one(argv)
    check_paths(options)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = options.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    results = run_evaluation(
        model=options.model,
        data=options.data,
        output=options.output,
        tasks=options.task_list(),
        trials=options.trials,
        mixtures=options.mixtures,
        device=device,
        batch_seconds=options.batch_seconds,
        seed=options.seed,
        cache_dir=options.cache_dir,
        trust_remote_code=options.trust_remote_code,
        nontarget_ratio=options.nontarget_ratio,
        downstream_epochs=options.downstream_epochs,
        downstream_batch_size=options.downstream_batch_size,
        downstream_crop_seconds=options.downstream_crop_seconds,
        downstream_lr=options.downstream_lr,
        window_seconds=options.window_seconds,
        window_hop_seconds=options.window_hop_seconds,
        mixtures_per_count=options.mixtures_per_count,
        command=shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["evaluate.py", *argv]),
        progress=not options.no_progress,
    )
    failed = {name: entry["error"] for name, entry in results["tasks"].items() if "error" in entry}
    print(f"results: {options.output}/results.json, {options.output}/results.md")
    for name, error in failed.items():
        print(f"task {name} failed: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    main_entry(main)
