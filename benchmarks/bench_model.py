"""Training-step speed of DELULU vs transformers' HuBERT with the same dimensions.

One step = forward + backward of `DeluluForPreTraining` (16 ms frames) against `HubertModel` plus an
equivalent cluster head (20 ms frames, HuBERT's strides), on the same batch, in the same process,
timed in alternating runs (DELULU, HuBERT, DELULU, ...) so that load changes on a shared machine hit
both alike. Both models get identical hyperparameters (dims, conv kernels, layer-norm front end,
dropouts, mask spans) except the conv strides; layerdrop is off in both so every step runs all
layers. Masks, labels and the corrupted flags are drawn once, outside the timed region, as a
collator would.

DELULU has 25% more frames per second of audio than HuBERT (62.5 vs 50), so a ratio >= 1 means its
implementation more than pays for the extra frames.

Precision: ``--dtype auto`` trains under bf16 autocast (as pretraining does) where the hardware has
fast bf16 (CUDA, or a CPU with AVX512-BF16/AMX), else float32. In float32 on CPU both models are
bound by the same matmuls, so DELULU's 25% more frames show up almost in full (ratio ~0.8); DELULU's
savings (no transpose copies, contiguous layer norm / GELU in the conv front end) pay off once the
matmuls are cheap.

The headline ratio is the median over pairs of (HuBERT step time / DELULU step time): both steps
of a pair run back to back, so slow drifts in the load of a shared machine cancel within a pair,
and the median discards pairs where one step was hit by a burst. The ratio of process CPU times is
printed too (single-threaded, the default, it is insensitive to other processes).

Usage: ``python benchmarks/bench_model.py [--batch-size 2 --seconds 4 --dtype auto --threads 1 --budget-s 90]``.
Ends with ``RESULT step_speedup_vs_hubert <ratio> x``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import HubertConfig, HubertModel
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from delulu_hf import DeluluConfig, DeluluForPreTraining, feat_extract_output_lengths

HUBERT_STRIDES = (5, 2, 2, 2, 2, 2, 2)


class HubertWithClusterHead(nn.Module):
    """HuBERT + the same head as `DeluluForPreTraining`: cosine logits over cluster embeddings, masked CE
    plus lambda * CE on unmasked frames of corrupted items."""

    def __init__(
        self, config: HubertConfig, num_clusters: int, final_dim: int, temperature: float, weight: float
    ):
        super().__init__()
        self.hubert = HubertModel(config)
        self.final_proj = nn.Linear(config.hidden_size, final_dim)
        self.label_embeddings = nn.Parameter(torch.randn(num_clusters, final_dim))
        self.temperature, self.weight = temperature, weight

    def forward(self, input_values, labels, mask_time_indices, corrupted):
        hidden = self.hubert(input_values, mask_time_indices=mask_time_indices).last_hidden_state
        proj = F.normalize(self.final_proj(hidden).float(), dim=-1)
        logits = proj @ F.normalize(self.label_embeddings.float(), dim=-1).t() / self.temperature
        masked = mask_time_indices & (labels != -100)
        denoise = ~mask_time_indices & (labels != -100) & corrupted[:, None]
        loss = F.cross_entropy(logits[masked], labels[masked])
        return loss + self.weight * F.cross_entropy(logits[denoise], labels[denoise])


def hubert_config_like(config: DeluluConfig) -> HubertConfig:
    """HubertConfig with DELULU's dimensions and hyperparameters, and HuBERT's 20 ms strides."""
    return HubertConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        hidden_dropout=config.hidden_dropout,
        activation_dropout=config.activation_dropout,
        attention_dropout=config.attention_dropout,
        feat_proj_dropout=config.feat_proj_dropout,
        layerdrop=config.layerdrop,
        layer_norm_eps=config.layer_norm_eps,
        feat_extract_norm="layer",
        feat_extract_activation=config.feat_extract_activation,
        feat_proj_layer_norm=config.feat_proj_layer_norm,
        conv_dim=tuple(config.conv_dim),
        conv_kernel=tuple(config.conv_kernel),
        conv_stride=HUBERT_STRIDES,
        conv_bias=config.conv_bias,
        num_conv_pos_embeddings=config.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=config.num_conv_pos_embedding_groups,
        do_stable_layer_norm=config.do_stable_layer_norm,
        mask_time_prob=config.mask_time_prob,
        mask_time_length=config.mask_time_length,
        mask_time_min_masks=config.mask_time_min_masks,
    )


def frames_for(kernels, strides, samples: int) -> int:
    for kernel, stride in zip(kernels, strides):
        samples = (samples - kernel) // stride + 1
    return samples


def fast_bf16_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="utterance length (16 kHz)")
    parser.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 autocast where fast"
    )
    parser.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    parser.add_argument("--min-pairs", type=int, default=3)
    parser.add_argument("--max-pairs", type=int, default=20)
    parser.add_argument(
        "--budget-s", type=float, default=90.0, help="stop timing once this many seconds have passed"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads; 0 = torch's default. 1 (default) keeps the ratio steady on a shared machine, where "
        "multi-threaded steps mostly measure waiting for descheduled threads",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and fast_bf16_available(device))
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if use_bf16
        else contextlib.nullcontext()
    )
    torch.manual_seed(args.seed)

    config = DeluluConfig(layerdrop=0.0)
    delulu = DeluluForPreTraining(config).to(device).train()
    hubert = (
        HubertWithClusterHead(
            hubert_config_like(config),
            config.num_clusters,
            config.final_dim,
            config.logit_temperature,
            config.denoise_loss_weight,
        )
        .to(device)
        .train()
    )

    samples = int(args.seconds * 16000)
    generator = torch.Generator().manual_seed(args.seed)
    waveform = torch.randn(args.batch_size, samples, generator=generator).to(device)
    corrupted = (torch.rand(args.batch_size, generator=generator) < 0.5).to(device)
    corrupted[0] = True  # at least one corrupted item, so both models compute the denoise term

    def batch_for(num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = _compute_mask_indices(
            (args.batch_size, num_frames), config.mask_time_prob, config.mask_time_length, min_masks=2
        )
        labels = torch.randint(0, config.num_clusters, (args.batch_size, num_frames), generator=generator)
        return torch.as_tensor(mask, device=device), labels.to(device)

    delulu_frames = feat_extract_output_lengths(config, samples)
    hubert_frames = frames_for(config.conv_kernel, HUBERT_STRIDES, samples)
    delulu_mask, delulu_labels = batch_for(delulu_frames)
    hubert_mask, hubert_labels = batch_for(hubert_frames)

    def delulu_step() -> None:
        with autocast:
            out = delulu(waveform, labels=delulu_labels, mask_time_indices=delulu_mask, corrupted=corrupted)
        out.loss.backward()
        delulu.zero_grad(set_to_none=True)

    def hubert_step() -> None:
        with autocast:
            loss = hubert(waveform, hubert_labels, hubert_mask, corrupted)
        loss.backward()
        hubert.zero_grad(set_to_none=True)

    def timed(step) -> tuple[float, float]:
        """Wall-clock and process CPU seconds of one step."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    print(
        f"device={device} threads={torch.get_num_threads()} precision={'bf16 autocast' if use_bf16 else 'fp32'} "
        f"batch={args.batch_size}x{args.seconds:g}s frames: delulu={delulu_frames} hubert={hubert_frames}",
        flush=True,
    )
    delulu_step(), hubert_step()  # warm-up (allocator, oneDNN kernel selection)
    times: dict[str, list[tuple[float, float]]] = {"delulu": [], "hubert": []}
    for pair in range(args.max_pairs):
        # Alternate which model goes first, so neither always runs right after the other.
        order = (("delulu", delulu_step), ("hubert", hubert_step))
        for name, step in order if pair % 2 == 0 else order[::-1]:
            times[name].append(timed(step))
        print(
            f"pair {pair + 1}: delulu {times['delulu'][-1][0]:.3f}s  hubert {times['hubert'][-1][0]:.3f}s",
            flush=True,
        )
        if pair + 1 >= args.min_pairs and time.perf_counter() - start > args.budget_s:
            break

    wall = {name: [t[0] for t in runs] for name, runs in times.items()}
    cpu = {name: [t[1] for t in runs] for name, runs in times.items()}
    pair_ratios = [hubert / delulu for delulu, hubert in zip(wall["delulu"], wall["hubert"])]
    delulu_s, hubert_s = statistics.median(wall["delulu"]), statistics.median(wall["hubert"])
    cpu_ratio = statistics.median(cpu["hubert"]) / statistics.median(cpu["delulu"])
    audio_s = args.batch_size * args.seconds
    print(f"RESULT delulu_step_s {delulu_s:.3f} s")
    print(f"RESULT hubert_step_s {hubert_s:.3f} s")
    print(f"RESULT delulu_audio_s_per_s {audio_s / delulu_s:.2f} x")
    print(f"RESULT step_speedup_vs_hubert_cpu_time {cpu_ratio:.3f} x")
    print(f"RESULT step_speedup_vs_hubert {statistics.median(pair_ratios):.3f} x")


if __name__ == "__main__":
    main()
