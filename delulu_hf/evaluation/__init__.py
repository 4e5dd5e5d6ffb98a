"""Speaker evaluation for DELULU and any other speech encoder.

* ``metrics``: ``compute_eer``, ``compute_min_dcf``, ``diarization_error_rate``, DET plots, RTTM I/O
  (also as ``evaluate`` modules under ``metric_modules/{eer,min_dcf,der}``).
* ``features``: encoders (DELULU / transformers, ReDimNet teacher, ``mfcc``) and cached, length-batched
  feature extraction.
* ``tasks``: zero-shot and downstream verification, identification, profiling, counting,
  diarization, the results writers and ``run_evaluation`` (what ``training/evaluate.py`` calls).

The metrics import eagerly (light); the rest loads on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .metrics import (
    compute_eer,
    compute_min_dcf,
    diarization_error_rate,
    plot_det_curves,
    read_rttm,
    write_rttm,
)

# ``evaluate.load(str(METRIC_MODULES / "eer"))`` works offline, also from an installed wheel.
METRIC_MODULES = Path(__file__).resolve().parent / "metric_modules"

_LAZY = {
    "extract_features": "features",
    "load_encoder": "features",
    "run_evaluation": "tasks",
    "TASKS": "tasks",
}

__all__ = [
    "METRIC_MODULES",
    "TASKS",
    "compute_eer",
    "compute_min_dcf",
    "diarization_error_rate",
    "extract_features",
    "load_encoder",
    "plot_det_curves",
    "read_rttm",
    "run_evaluation",
    "write_rttm",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
