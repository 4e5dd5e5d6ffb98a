"""Model outputs and batches in, training metrics out: losses, accuracy, throughput, MFU, JSONL log, plot.

``RunningMetrics`` sums over micro-batches and processes between two log lines; ``MetricsLog``
keeps one trajectory in ``output_dir/metrics.jsonl`` (cut back to the checkpoint's step on resume)
and draws ``loss_curves.png`` at the end. MFU divides the analytic FLOPs of ``pretraining_flops``
by the device peak of ``peak_flops_per_second``.
"""

from __future__ import annotations

import json
import os
import time
import types
from typing import TYPE_CHECKING, Any

import torch

from delulu_hf.atomic import atomic_write_text
from delulu_hf.configuration_delulu import feat_extract_output_lengths
from delulu_hf.pretraining.arguments import SAMPLE_RATE, model_architecture

if TYPE_CHECKING:
    from delulu_hf.pretraining.arguments import PretrainConfig

__all__ = [
    "METRICS_NAME",
    "PEAK_BF16_FLOPS",
    "MetricsLog",
    "RunningMetrics",
    "flat_hparams",
    "peak_flops_per_second",
    "pretraining_flops",
]

METRICS_NAME = "metrics.jsonl"


def pretraining_flops(config, num_samples: int, batch_size: int = 1, backward: bool = True) -> float:
    """Matmul/conv FLOPs of ``DeluluForPreTraining`` on ``batch_size`` items of ``num_samples``.

    Counts 2 FLOPs per multiply-add in the conv front end, feature projection, positional conv,
    attention (projections and the two ``T x T`` products), feed-forward layers and the cluster head;
    elementwise work is ignored (a few percent). Training (``backward``) = 3x forward.
    """
    flops, channels, length = 0.0, 1, int(num_samples)
    for i, (dim, kernel) in enumerate(zip(config.conv_dim, config.conv_kernel)):
        # output length of conv layer i = the frame count of the stack cut after layer i
        first_layers = types.SimpleNamespace(
            conv_kernel=config.conv_kernel[: i + 1], conv_stride=config.conv_stride[: i + 1]
        )
        length = feat_extract_output_lengths(first_layers, int(num_samples))
        flops += 2.0 * channels * dim * kernel * length
        channels = dim
    frames, hidden = length, config.hidden_size
    flops += 2.0 * channels * hidden * frames  # feature projection
    flops += (
        2.0
        * hidden
        * (hidden // config.num_conv_pos_embedding_groups)
        * config.num_conv_pos_embeddings
        * frames
    )
    per_layer = 2.0 * 4 * hidden * hidden * frames + 2.0 * 2 * frames * frames * hidden
    per_layer += 2.0 * 2 * hidden * config.intermediate_size * frames
    flops += config.num_hidden_layers * per_layer
    flops += 2.0 * hidden * config.final_dim * frames + 2.0 * config.final_dim * config.num_clusters * frames
    return flops * batch_size * (3.0 if backward else 1.0)


class RunningMetrics:
    """Sums over micro-batches (and, at ``summary``, over processes) between two log lines.

    Loss terms are frame-weighted over the whole logging window, the way the update loss is over an
    update (``delulu_hf.pretraining.loss``): summed frame cross-entropies over summed frame counts,
    the feature penalty weighted by masked frames. Micro-batches with a non-finite loss are left out
    (a skipped step does not drag the curve to NaN or 0). Accuracy sums argmax hits over masked frames
    exactly (all NaN when no micro-batch of the window was finite); throughput counts unpadded audio; MFU (GPU only) divides the analytic FLOPs of the padded
    batches by the peak.
    """

    KEYS = (
        "masked_sum",
        "masked_count",
        "denoise_sum",
        "denoise_count",
        "penalty",
        "finite",
        "correct",
        "samples",
        "flops",
    )

    def __init__(self, model_config, device: torch.device, peak_flops: float | None = None):
        self.config, self.peak = model_config, peak_flops
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.start = time.perf_counter()

    def add(self, out, batch: dict[str, torch.Tensor]) -> None:
        masked = out.masked_count.double()
        terms = torch.stack(
            [
                out.masked_loss_sum.detach().double(),
                masked,
                out.denoise_loss_sum.detach().double(),
                out.denoise_count.double(),
                out.feature_penalty.detach().double() * masked,
            ]
        )
        finite = torch.isfinite(terms).all()
        values = batch["input_values"]
        flops = pretraining_flops(self.config, values.shape[-1], values.shape[0])
        extra = torch.stack([out.masked_correct, batch["attention_mask"].sum()]).to(self.sums)
        self.sums += torch.cat(
            [torch.where(finite, terms, 0.0), finite.double()[None], extra, self.sums.new_tensor([flops])]
        )

    def summary(self, accelerator) -> dict[str, float]:
        """Reduce over processes (a collective: call on every process), return the record, reset."""
        sums = dict(zip(self.KEYS, accelerator.reduce(self.sums, reduction="sum").tolist()))
        elapsed = time.perf_counter() - self.start
        masked = max(sums["masked_count"], 1.0)
        if not sums["finite"]:  # every micro-batch of the window was non-finite: say so, not 0.0
            masked = float("nan")
        record = {
            "masked_loss": sums["masked_sum"] / masked,
            "denoise_loss": sums["denoise_sum"] / max(sums["denoise_count"], 1.0),
            "feature_penalty": sums["penalty"] / masked,
            "masked_accuracy": sums["correct"] / masked,
            "audio_seconds_per_second": sums["samples"] / SAMPLE_RATE / elapsed,
        }
        record["loss"] = (
            record["masked_loss"]
            + self.config.denoise_loss_weight * record["denoise_loss"]
            + self.config.feature_penalty_weight * record["feature_penalty"]
        )
        if self.peak:
            record["mfu"] = sums["flops"] / elapsed / (self.peak * accelerator.num_processes)
        self.sums.zero_()
        self.start = time.perf_counter()
        return record


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; MFU uses these unless
# `peak_flops` is set. Order matters: the first substring found in the device name wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
    ("4090", 165e12),
)


def peak_flops_per_second(device: torch.device | str, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device for MFU; ``None`` off GPU or for an unknown GPU (set ``peak_flops``)."""
    if override:
        return float(override)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def flat_hparams(cfg: PretrainConfig, model_config) -> dict[str, Any]:
    """Scalar-only hyper-parameters for TensorBoard (lists become strings)."""
    out: dict[str, Any] = {}
    values = {**cfg.to_dict(), **{f"model.{k}": v for k, v in model_architecture(model_config).items()}}
    for key, value in values.items():
        if key == "model":
            continue
        out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class MetricsLog:
    """Metrics as JSON lines in ``output_dir/metrics.jsonl`` (main process) and a loss plot at the end.

    On resume the file is cut back to the checkpoint's step, so it always holds one trajectory.
    """

    def __init__(self, output_dir: str, resume_step: int | None = None, enabled: bool = True):
        self.path = os.path.join(output_dir, METRICS_NAME)
        self.enabled = enabled
        if not enabled:
            return
        kept = [r for r in self.read(self.path) if resume_step is not None and r["step"] <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    @staticmethod
    def read(path: str) -> list[dict[str, Any]]:
        if not os.path.isfile(path):
            return []
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def plot(self) -> str | None:
        """``loss_curves.png``: total/masked/denoise loss and masked accuracy against step."""
        records = self.read(self.path) if self.enabled else []
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in records]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
        for key in ("loss", "masked_loss", "denoise_loss"):
            ax_loss.plot(steps, [r.get(key, float("nan")) for r in records], label=key)
        ax_loss.set_xlabel("step"), ax_loss.set_ylabel("cross-entropy"), ax_loss.legend()
        ax_acc.plot(steps, [r.get("masked_accuracy", float("nan")) for r in records], color="C3")
        ax_acc.set_xlabel("step"), ax_acc.set_ylabel("masked-frame accuracy")
        fig.tight_layout()
        path = os.path.join(os.path.dirname(self.path), "loss_curves.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
