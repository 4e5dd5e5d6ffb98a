"""A model and a dataset in, the speaker evaluation out: runs the tasks, writes results and plots.

``run_evaluation`` is what ``training/evaluate.py`` and the replication experiment call. The
protocols (``shared/docs/evaluation-protocols.md``) live in one module each:

* ``verification``, ``verification_downstream``: ``delulu_hf.evaluation.verification``;
* ``identification``, ``profiling``, ``counting``: ``delulu_hf.evaluation.probes``;
* ``diarization``: ``delulu_hf.evaluation.diarization``.

Features are extracted once per audio set (``delulu_hf.evaluation.features``), every task reads
them, and every number comes with its counts and seed (``delulu_hf.evaluation.report``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from delulu_hf.errors import UserError
from delulu_hf.evaluation.data import (
    Corpus,
    Mixtures,
    generate_mixtures,
    generate_trials,
    read_trials,
    speaker_split,
)
from delulu_hf.evaluation.diarization import diarization, diarization_windows
from delulu_hf.evaluation.encoders import Encoder, load_encoder, model_spec_problem
from delulu_hf.evaluation.features import extract_features
from delulu_hf.evaluation.metrics import plot_det_curves
from delulu_hf.evaluation.probes import counting, identification, profiling
from delulu_hf.evaluation.report import write_results
from delulu_hf.evaluation.verification import downstream_verification, zero_shot_verification

logger = logging.getLogger(__name__)

TASKS = (
    "verification",
    "verification_downstream",
    "identification",
    "profiling",
    "counting",
    "diarization",
)

__all__ = ["TASKS", "run_evaluation"]


@contextmanager
def _step(name: str, wall_seconds: dict[str, float]) -> Iterator[None]:
    """Log a line when a step starts and when it ends (with its wall time); record the time."""
    logger.info("%s: started", name)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        logger.info("%s: stopped by an error after %.1f s", name, time.perf_counter() - start)
        raise
    wall_seconds[name] = round(time.perf_counter() - start, 1)
    logger.info("%s: done in %.1f s", name, wall_seconds[name])


def run_evaluation(
    model: str,
    data: str | Path,
    output: str | Path,
    tasks: Sequence[str] = ("verification", "identification", "profiling"),
    trials: str | Path | None = None,
    mixtures: str | Path | None = None,
    device: str = "cpu",
    batch_seconds: float = 60.0,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    nontarget_ratio: float = 1.0,
    downstream_epochs: int = 10,
    downstream_batch_size: int = 32,
    downstream_crop_seconds: float = 3.0,
    downstream_lr: float = 1e-3,
    downstream_head_overrides: dict[str, Any] | None = None,
    frames_max_seconds: float = 20.0,
    window_seconds: float = 1.5,
    window_hop_seconds: float = 0.75,
    counting_counts: Sequence[int] = (1, 2, 3, 4),
    mixtures_per_count: int = 12,
    encoder: Encoder | None = None,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the requested tasks for one model and write ``results.json``, ``results.md`` and plots.

    Features are extracted once per audio set (corpus, mixtures, diarization windows) and cached
    under ``cache_dir`` (default ``output/cache``). A task that cannot run on the given data
    (for instance profiling without a ``gender`` column) is recorded with an ``error`` entry and
    the others still run. Each step logs a line when it starts and ends (with its wall time, also
    in ``results["wall_seconds"]``) and shows a progress bar unless ``progress=False``.
    """
    started = time.perf_counter()
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    problem = model_spec_problem(model, trust_remote_code) if encoder is None else None
    if problem is not None:
        raise UserError(f"model {model}: {problem}")
    # Read the data before loading a model or creating the output folder: a wrong path or a
    # malformed metadata.csv fails at once, and leaves nothing behind.
    corpus = Corpus.load(data)
    split = speaker_split(corpus, seed)
    verify = "verification" in tasks or "verification_downstream" in tasks
    trial_set = None
    if verify and trials is not None and not Path(trials).is_file():
        raise UserError(f"trials file {trials} does not exist")
    trials_path = Path(trials) if trials else Path(data) / "trials.csv"
    if verify and trials_path.is_file():
        trial_set = read_trials(trials_path, corpus)
    mixture_tasks = "counting" in tasks or "diarization" in tasks
    given = Mixtures.load(mixtures) if mixtures and mixture_tasks else None
    corpus_tasks = [
        t for t in tasks if t in ("verification", "verification_downstream", "identification", "profiling")
    ]
    # Audio headers are read here too (lengths for batching), so an unreadable file is reported
    # before anything is loaded or created.
    corpus_items = corpus.items() if corpus_tasks else []
    output = Path(output)
    load_seconds: dict[str, float] = {}
    if encoder is None:  # before the output folder exists: a model that does not load leaves nothing
        with _step(f"loading {model}", load_seconds):
            encoder = load_encoder(model, device=device, trust_remote_code=trust_remote_code)
    output.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else output / "cache"
    speaker_of = corpus.speaker_of
    results: dict[str, Any] = {
        "model": model,
        "data": str(data),
        "mixtures": str(mixtures) if mixtures else None,
        "seed": seed,
        "command": command,
        "encoder": {
            "kind": encoder.kind,
            "streams": encoder.streams,
            "primary": encoder.primary,
            "frame_hop_seconds": encoder.frame_hop_seconds,
        },
        "speaker_split": {
            "source": split.source,
            "n_train_speakers": len(split.train),
            "n_test_speakers": len(split.test),
        },
        "extraction": {},
        "tasks": {},
        "wall_seconds": {"load model": next(iter(load_seconds.values()), 0.0)},
    }
    wall_seconds = results["wall_seconds"]
    extract = dict(cache_dir=cache_dir, batch_seconds=batch_seconds, progress=progress)

    features = None
    if corpus_tasks:
        with_frames = "verification_downstream" in tasks
        max_frames = round(frames_max_seconds / encoder.frame_hop_seconds) if with_frames else None
        with _step("features: corpus", wall_seconds):
            features = extract_features(
                encoder,
                corpus_items,
                with_frames=with_frames,
                max_frames=max_frames,
                description="corpus",
                **extract,
            )
        results["extraction"]["corpus"] = features.stats

    if verify and trial_set is None:
        trial_set = generate_trials(corpus, split.test, seed=seed, nontarget_ratio=nontarget_ratio)

    def run(name: str, fn, *args, **kwargs) -> None:
        with _step(f"task {name}", wall_seconds):
            try:
                results["tasks"][name] = fn(*args, **kwargs)
            except ValueError as err:  # data that does not support the task: record it, run the others
                logger.error("task %s failed: %s", name, err)
                results["tasks"][name] = {"error": str(err)}

    if "verification" in tasks:
        run(
            "verification",
            zero_shot_verification,
            features,
            trial_set,
            None,
            seed,
            speaker_of,
            progress=progress,
        )
    if "verification_downstream" in tasks:
        train_files = [r["file_name"] for r in corpus.rows if r["speaker_id"] in set(split.train)]
        run(
            "verification_downstream",
            downstream_verification,
            encoder,
            features,
            train_files,
            speaker_of,
            trial_set,
            output,
            seed=seed,
            epochs=downstream_epochs,
            batch_size=downstream_batch_size,
            crop_seconds=downstream_crop_seconds,
            lr=downstream_lr,
            device=device,
            progress=progress,
            head_overrides=downstream_head_overrides,
        )
    curves = {}
    for name in ("verification", "verification_downstream"):
        curves.update(results["tasks"].get(name, {}).get("_curves", {}))
    if curves:
        det = plot_det_curves(curves, output / "det_verification.png", title=f"Verification: {model}")
        for name in ("verification", "verification_downstream"):
            if "_curves" in results["tasks"].get(name, {}):
                results["tasks"][name]["det_curve"] = det.name
    if "identification" in tasks:
        run("identification", identification, features, corpus, seed=seed, progress=progress)
    if "profiling" in tasks:
        run("profiling", profiling, features, corpus, split, seed=seed, progress=progress)

    if "counting" in tasks or "diarization" in tasks:
        present = given.counts if given is not None else Counter()
        per_count = int(np.median(list(present.values()))) if present else mixtures_per_count
        # Counting covers every count in counting_counts: counts the given mixtures lack (the demo
        # ships 2-4 speakers, no single-speaker "conversations") are generated the same way from
        # held-out speakers. Diarization uses the given mixtures, or generated ones when none.
        missing = {}
        if "counting" in tasks or given is None:
            missing = {k: per_count for k in counting_counts if k not in present}
        generated = None
        if missing:
            try:
                generated = generate_mixtures(
                    corpus, split.test, missing, output / "generated_mixtures", seed=seed
                )
                results["generated_mixtures"] = {
                    "folder": "generated_mixtures",
                    "counts": dict(sorted(generated.counts.items())),
                    "speakers": "held-out (test) speakers",
                    "seed": seed,
                }
            except ValueError as err:
                logger.error("mixture generation failed: %s", err)
                results["generated_mixtures"] = {"error": str(err)}
        count_set = given + generated if given is not None and generated is not None else given or generated
        diarization_set = given if given is not None else generated
        if "counting" in tasks:
            if count_set is None:
                results["tasks"]["counting"] = {"error": "no mixtures given and none could be generated"}
            else:
                with _step("features: mixtures", wall_seconds):
                    mix_features = extract_features(
                        encoder, count_set.items(), description="mixtures", **extract
                    )
                results["extraction"]["mixtures"] = mix_features.stats
                run("counting", counting, mix_features, count_set, seed=seed, progress=progress)
        if "diarization" in tasks:
            windows = (
                diarization_windows(diarization_set, window_seconds, window_hop_seconds)
                if diarization_set
                else []
            )
            if not windows:
                results["tasks"]["diarization"] = {"error": "no mixture with an RTTM reference"}
            else:
                with _step("features: diarization windows", wall_seconds):
                    window_features = extract_features(encoder, windows, description="windows", **extract)
                results["extraction"]["windows"] = window_features.stats
                run(
                    "diarization",
                    diarization,
                    window_features,
                    windows,
                    diarization_set,
                    output,
                    seed=seed,
                    progress=progress,
                )
    wall_seconds["total"] = round(time.perf_counter() - started, 1)
    logger.info("evaluation done in %.1f s", wall_seconds["total"])
    write_results(results, output)
    return results
