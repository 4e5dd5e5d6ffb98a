"""Speaker segments and their RTTM files: the one reader and writer of diarization references.

A ``Segment`` is ``(start, end, speaker)`` in seconds. It is a ``NamedTuple``, so code may use
attributes (``seg.start``) or unpack it (``start, end, speaker = seg``). RTTM is the NIST format
md-eval, pyannote and dscore read: one ``SPEAKER`` line per segment.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple, Union

from delulu_hf.atomic import atomic_write_text

PathLike = Union[str, os.PathLike]

__all__ = ["Segment", "read_rttm", "rttm_lines", "write_rttm"]


class Segment(NamedTuple):
    """One speaker-labelled interval in seconds (an RTTM SPEAKER line)."""

    start: float
    end: float
    speaker: str

    @property
    def duration(self) -> float:
        return self.end - self.start


def rttm_lines(file_id: str, segments: Iterable) -> str:
    """RTTM SPEAKER lines for ``segments`` (any ``(start, end, speaker)`` triples), in time order."""
    rows = sorted(Segment(float(s), float(e), str(spk)) for s, e, spk in segments)
    return "".join(
        f"SPEAKER {file_id} 1 {s.start:.3f} {s.duration:.3f} <NA> <NA> {s.speaker} <NA> <NA>\n" for s in rows
    )


def write_rttm(path: PathLike, file_id: str, segments: Iterable) -> None:
    """Write ``segments`` of one recording as an RTTM file (atomically)."""
    atomic_write_text(path, rttm_lines(file_id, segments), newline="")


def read_rttm(path: PathLike) -> dict[str, list[Segment]]:
    """Parse RTTM SPEAKER lines into ``{file_id: [Segment, ...]}``; other line types are skipped."""
    out: dict[str, list[Segment]] = {}
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            fields = line.split()
            if not fields or fields[0] != "SPEAKER":
                continue
            if len(fields) < 8:
                raise ValueError(
                    f"{os.fspath(path)}:{lineno}: SPEAKER line needs at least 8 fields, got {line.strip()!r}"
                )
            start, duration = float(fields[3]), float(fields[4])
            out.setdefault(fields[1], []).append(Segment(start, start + duration, fields[7]))
    return out
