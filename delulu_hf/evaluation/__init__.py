"""Speech encoder and speaker data in, speaker evaluation out (DELULU or any other encoder).

One module per step, in the order the data flows:

* ``metrics``: ``compute_eer``, ``compute_min_dcf``, ``diarization_error_rate`` (pyannote.metrics),
  DET plots; also as ``evaluate`` modules under ``metric_modules/{eer,min_dcf,der}``.
* ``encoders``: DELULU / transformers encoders, the ReDimNet teacher, the ``mfcc`` baseline
  (``load_encoder``).
* ``features``: audio items, cached length-batched extraction (``extract_features``).
* ``data``: corpus, speaker split, trials, mixtures (read or generated).
* ``verification``, ``probes``, ``diarization``: the tasks.
* ``report``: per-layer summaries, ``results.json`` / ``results.md``.
* ``suite``: ``run_evaluation`` and ``TASKS`` (what ``training/evaluate.py`` calls).

RTTM files are read and written by ``delulu_hf.segments`` (``read_rttm`` / ``write_rttm`` are
re-exported here). The metrics import eagerly (light); the rest loads on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from delulu_hf.segments import read_rttm, write_rttm

from .metrics import compute_eer, compute_min_dcf, diarization_error_rate, plot_det_curves

# ``evaluate.load(str(METRIC_MODULES / "eer"))`` works offline, also from an installed wheel.
METRIC_MODULES = Path(__file__).resolve().parent / "metric_modules"

_LAZY = {
    "run_evaluation": "suite",
    "TASKS": "suite",
    "load_encoder": "encoders",
    "Encoder": "encoders",
    "extract_features": "features",
    "AudioItem": "features",
    "FeatureSet": "features",
    "Corpus": "data",
    "Mixtures": "data",
    "Trials": "data",
    "speaker_split": "data",
    "write_results": "report",
    "results_markdown": "report",
}

__all__ = [
    "METRIC_MODULES",
    "TASKS",
    "AudioItem",
    "Corpus",
    "Encoder",
    "FeatureSet",
    "Mixtures",
    "Trials",
    "compute_eer",
    "compute_min_dcf",
    "diarization_error_rate",
    "extract_features",
    "load_encoder",
    "plot_det_curves",
    "read_rttm",
    "results_markdown",
    "run_evaluation",
    "speaker_split",
    "write_results",
    "write_rttm",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
