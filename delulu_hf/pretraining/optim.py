"""A model and the run config in, the optimizer, its schedule and the non-finite-update guard out.

The recipe is the paper's (= fairseq HuBERT-Base): AdamW with decoupled weight decay (on every
parameter as fairseq does with ``weight_decay_exclusions: none``, or, the default, not on biases and
norms), linear warmup then polynomial decay, counted in optimizer updates. ``NonFiniteGuard`` decides, per
update, whether to apply it: an update whose loss or gradient norm is NaN/Inf is skipped and
counted, and a run of them aborts training with advice instead of burning compute.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from delulu_hf.pretraining.arguments import PretrainConfig

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "build_optimizer_and_scheduler"]


def build_optimizer_and_scheduler(model: torch.nn.Module, cfg: PretrainConfig, fused: bool | None = None):
    """AdamW + polynomial decay with warmup.

    Weight decay skips biases, norms and other 1-D parameters unless ``cfg.weight_decay_exclusions``
    is ``"none"`` (fairseq's HuBERT decays every parameter).

    The schedule counts optimizer updates: linear warmup over ``warmup_steps`` to ``learning_rate``,
    then ``(1 - progress) ** lr_power`` decay to ``lr_end`` at ``lr_decay_steps`` (or ``max_steps``).
    """
    from transformers import get_polynomial_decay_schedule_with_warmup

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            excluded = param.ndim < 2 or "norm" in name.lower()
            if cfg.weight_decay_exclusions == "biases_and_norms" and excluded:
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_epsilon, fused=fused or None
    )
    total = cfg.lr_decay_steps or cfg.max_steps
    scheduler = get_polynomial_decay_schedule_with_warmup(
        optimizer,
        num_warmup_steps=min(cfg.warmup_steps, total - 1),  # transformers divides by total - warmup
        num_training_steps=total,
        lr_end=cfg.lr_end,
        power=cfg.lr_power,
    )
    return optimizer, scheduler


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """Skips updates whose loss or gradient norm is NaN/Inf, counts them, aborts after N in a row.

    A single bad batch (a numerically nasty crop, a bf16 overflow) costs one skipped update; a
    run that keeps producing them has diverged, and continuing would only burn compute, so the
    guard raises ``NonFiniteLossError`` with what to try.
    """

    def __init__(self, max_consecutive: int = 10):
        self.max_consecutive = int(max_consecutive)
        self.total = 0
        self.consecutive = 0

    def check(self, finite: bool, step: int) -> bool:
        """Record one optimizer step; ``True`` means apply the update, ``False`` means skip it."""
        if finite:
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        logger.warning(
            "Step %d: non-finite loss or gradient norm; update skipped (%d in a row, %d in total)",
            step,
            self.consecutive,
            self.total,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} optimizer steps in a row (up to step {step}) had a non-finite loss or "
                f"gradient norm ({self.total} skipped in total), so training stopped. Resume from the last "
                "checkpoint with a lower learning_rate or longer warmup_steps, check the data for broken "
                "audio, or raise max_consecutive_nonfinite."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])
