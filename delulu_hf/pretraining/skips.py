"""Bad items met anywhere in a run in, one ledger out: each named in the log once, counted by stage.

A 400k-step run on a real corpus must not die on one broken file. With ``on_error: skip`` an item that
cannot be decoded, is empty, too short, non-finite, or whose labels do not fit its frame count is left
out and recorded here (``SkippedItems.add``); with ``on_error: raise`` (the default) the same call
stops the run with one line naming the file, the reason and the option. The ledger's totals go to the
metrics log and ``final/training_config.json``; the items met during training travel with checkpoints,
so a resumed run reports what the uninterrupted one would.

Stages: ``labelling`` (left out by ``prepare_labels.py`` or this run's label pass: already decided),
``decoding`` (the ``cache`` decode at start), ``checking`` (decoded items whose id count is not their
frame count, found at start), ``length`` (shorter than ``min_sample_length``: the intended filter,
never an error), ``training`` (met when a batch was assembled: on-the-fly decoding, labels that do
not fit the audio). Only ``decoding``, ``checking`` and ``training`` stop a run under ``raise``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch

from delulu_hf.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "SkippedItems", "bad_item_error"]

STAGES = ("labelling", "decoding", "checking", "length", "training")
STOPPING = ("decoding", "checking", "training")
EXAMPLES = 20  # items named in training_config.json (the full list goes to skipped_items.json)


def bad_item_error(message: str) -> UserError:
    """The one line a bad item ends a run with under ``on_error: raise`` (``message``: "NAME: reason")."""
    return UserError(f"{message}. Pass --on_error skip to leave such items out (logged and counted)")


def _reason(name: str, reason: str) -> str:
    """A reason without the item's name in front (``AudioDecodeError`` messages start with it)."""
    return reason[len(name) + 2 :] if reason.startswith(f"{name}: ") else reason


class SkippedItems:
    """The items a run left out: ``name -> (stage, reason)``, in the order met."""

    def __init__(self, on_error: str = "skip", log: bool = True):
        self.on_error, self.log = on_error, log  # log: the main process names what all processes meet alike
        self.items: dict[str, tuple[str, str]] = {}
        self.pending: str | None = None  # under raise: the first bad item met in this update

    def __len__(self) -> int:
        return len(self.items)

    def add(self, name: str, reason: str, stage: str, *, quiet: bool = False) -> None:
        """Record one bad item, logged the first time (unless ``quiet``). With ``on_error: raise`` a
        stage of ``STOPPING`` stops the run instead: at once, or for ``training`` (met by one process
        in the middle of an update) at the update's ``raise_if_any``, on every process together."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        reason = _reason(name, reason)
        if self.on_error == "raise" and stage in STOPPING:
            if stage != "training":
                raise bad_item_error(f"{name}: {reason}")
            self.pending = self.pending or f"{name}: {reason}"
            return
        if name in self.items:
            return
        self.items[name] = (stage, reason)
        if not quiet and (self.log or stage == "training"):
            logger.warning("Skipping %s (%s): %s", name, stage, reason)

    def raise_if_any(self, accelerator) -> None:
        """Under ``raise``: stop every process together when any of them met a bad item in this update
        (one tiny all-reduce per update with several processes), with the first one's line. Otherwise
        the one process would die alone and the others in their next collective, with tracebacks."""
        if self.on_error != "raise":
            return
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(self.pending is not None)], device=accelerator.device)
            if accelerator.reduce(flag, reduction="sum").item() == 0:
                return
            from accelerate.utils import gather_object

            self.pending = next(m for m in gather_object([self.pending]) if m is not None)
        if self.pending is not None:
            raise bad_item_error(self.pending)

    def counts(self) -> dict[str, int]:
        by_stage = Counter(stage for stage, _ in self.items.values())
        return {"total": len(self.items), **{stage: by_stage.get(stage, 0) for stage in STAGES}}

    def summary(self) -> dict[str, Any]:
        """For ``training_config.json``: counts by stage and the first items, named."""
        listed = [{"name": n, "stage": s, "reason": r} for n, (s, r) in list(self.items.items())[:EXAMPLES]]
        return {**self.counts(), "items": listed}

    def as_list(self) -> list[dict[str, str]]:
        return [{"name": n, "stage": s, "reason": r} for n, (s, r) in self.items.items()]

    # --- met during training: synced over processes, saved with checkpoints
    def training_items(self) -> list[list[str]]:
        return [[n, r] for n, (s, r) in self.items.items() if s == "training"]

    def load_training_items(self, items: list[list[str]]) -> None:
        for name, reason in items:
            self.items.setdefault(name, ("training", reason))

    def sync(self, accelerator) -> None:
        """Merge the items every process met during training (a collective: call on every process)."""
        if accelerator.num_processes == 1:
            return
        from accelerate.utils import gather_object

        for items in gather_object([self.training_items()]):
            self.load_training_items(items)
