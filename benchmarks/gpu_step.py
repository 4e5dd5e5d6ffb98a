"""DELULU Base pretraining step on one GPU, bf16: step time, memory, MFU, and throughput vs HuBERT Base.

Run through ``bash benchmarks/gpu_step.sh`` (checks for a GPU first), or directly:

    python benchmarks/gpu_step.py                              # CUDA, the two batch sizes below
    python benchmarks/gpu_step.py --device cpu --tiny          # a CPU dry run of the script itself

For each per-GPU micro-batch size (total samples, as ``max_batch_samples`` in the run configs;
1.4 M = HuBERT-Base's per-GPU batch, 2.8 M = ``base_4xh100.yaml``'s), one batch of 15.6 s crops is
built with the real collator (denoising corruption, span masks). Two models train on it, alternating
step by step so load changes hit both alike: ``DeluluForPreTraining`` (``DeluluConfig()`` = Base,
16 ms frames) and, the named reference, transformers' ``HubertModel`` at equal dimensions and
hyperparameters (HuBERT's 20 ms strides, the same layer-norm front end, SDPA attention) with the same
cluster head (``benchmarks/bench_model.py``). A step = forward + backward + clipping + fused AdamW
under bf16 autocast, layerdrop off; 3 warm-up steps each, then timed steps until ``--budget_s``.
MFU = analytic model FLOPs (``delulu_hf.pretraining.pretraining_flops``, 3x forward) / step time /
the GPU's dense bf16 peak. DELULU has 25% more frames per second of audio than HuBERT (62.5 vs 50),
so its throughput ratio counts audio seconds, not frames.

Writes ``gpu_step.json`` (into ``$OUT`` when set, else ``runs/``) and ends with RESULT lines:
``gpu_base_bf16_mfu``, ``gpu_step_throughput_vs_hubert`` (DELULU audio-s/s / HuBERT audio-s/s, at the
larger batch that fits) and per-size step time, audio-s/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_model import HUBERT_STRIDES, HubertWithClusterHead, hubert_config_like  # noqa: E402
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices  # noqa: E402

from delulu_hf import DeluluConfig, DeluluForPreTraining, feat_extract_output_lengths  # noqa: E402
from delulu_hf import pretraining as P  # noqa: E402

CROP = 250_000  # HuBERT's max_sample_size: 15.6 s
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    conv_dim=(32,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)


def speechlike(rng: np.random.Generator, samples: int) -> np.ndarray:
    t = np.arange(samples) / 16000
    wave = np.sin(2 * np.pi * rng.uniform(90, 240) * t) * (np.sin(2 * np.pi * 4 * t) > -0.2)
    return (0.1 * wave + 0.01 * rng.standard_normal(samples)).astype(np.float32)


def delulu_batch(config: DeluluConfig, total: int, crop: int, device: torch.device) -> dict:
    rng = np.random.default_rng(0)
    items = []
    for i in range(max(1, total // crop)):
        labels = rng.integers(0, config.num_clusters, feat_extract_output_lengths(config, crop))
        items.append({"input_values": speechlike(rng, crop), "labels": labels, "name": f"#{i}", "seed": i})
        items[-1].update(epoch=0, batch_index=0)
    batch = P.DeluluPretrainingCollator(config, crop)(items)
    batch.pop("epoch"), batch.pop("batch_index")
    batch["corrupted"][0] = True  # both models then always compute the denoising term
    return {k: v.to(device) for k, v in batch.items() if v is not None}


def hubert_batch(config: DeluluConfig, delulu: dict, device: torch.device) -> dict:
    """The same waveforms and corruption flags, with masks and labels at HuBERT's 20 ms frames."""
    values = delulu["input_values"]
    frames = feat_extract_output_lengths(DeluluConfig(conv_stride=HUBERT_STRIDES), values.shape[-1])
    mask = _compute_mask_indices(
        (values.shape[0], frames), config.mask_time_prob, config.mask_time_length, min_masks=2
    )
    labels = torch.randint(0, config.num_clusters, (values.shape[0], frames), generator=torch.Generator())
    return {
        "input_values": values,
        "labels": labels.to(device),
        "mask_time_indices": torch.as_tensor(mask, device=device),
        "corrupted": delulu["corrupted"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches (a dry run on CPU)")
    parser.add_argument("--batch_samples", type=int, nargs="+", default=[1_400_000, 2_800_000])
    parser.add_argument("--budget_s", type=float, default=100.0, help="timing budget per batch size")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = P.peak_flops_per_second(
        device, float(os.environ["PEAK_FLOPS"]) if os.environ.get("PEAK_FLOPS") else None
    )
    crop = 16000 if args.tiny else CROP
    sizes = [64000, 96000] if args.tiny else args.batch_samples
    config = DeluluConfig(layerdrop=0.0, **(TINY if args.tiny else {}))
    hubert_flops_config = DeluluConfig(
        layerdrop=0.0, conv_stride=HUBERT_STRIDES, **(TINY if args.tiny else {})
    )

    torch.manual_seed(0)
    models = {
        "delulu": DeluluForPreTraining(config).to(device).train(),
        "hubert": HubertWithClusterHead(
            hubert_config_like(config),
            config.num_clusters,
            config.final_dim,
            config.logit_temperature,
            config.denoise_loss_weight,
        )
        .to(device)
        .train(),
    }
    cfg = P.PretrainConfig()
    optimizers = {
        k: P.build_optimizer_and_scheduler(m, cfg, fused=device.type == "cuda")[0] for k, m in models.items()
    }
    params = sum(p.numel() for p in models["delulu"].parameters())
    print(
        f"{name}: DELULU {params / 1e6:.1f} M parameters vs HuBERT at equal dims; bf16 autocast; peak {peak}"
    )

    def step(key: str, batch: dict) -> float:
        model, optimizer = models[key], optimizers[key]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if key == "delulu":
                loss = model(**batch).loss
            else:
                loss = model(
                    batch["input_values"], batch["labels"], batch["mask_time_indices"], batch["corrupted"]
                )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if not torch.isfinite(loss.detach()):
            raise RuntimeError(f"{key}: non-finite loss {float(loss.detach())}")
        return time.perf_counter() - start

    rows = []
    for total in sizes:
        row: dict = {"max_batch_samples": total}
        try:
            batches = {"delulu": delulu_batch(config, total, crop, device)}
            batches["hubert"] = hubert_batch(config, batches["delulu"], device)
            times: dict[str, list[float]] = {"delulu": [], "hubert": []}
            memory = {"delulu": 0.0, "hubert": 0.0}
            started = time.perf_counter()
            for i in range(40):
                order = ("delulu", "hubert") if i % 2 == 0 else ("hubert", "delulu")
                for key in order:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    elapsed = step(key, batches[key])
                    if device.type == "cuda":
                        memory[key] = max(memory[key], torch.cuda.max_memory_allocated(device) / 2**30)
                    if i >= 3:
                        times[key].append(elapsed)
                if i >= 5 and time.perf_counter() - started > args.budget_s:
                    break
            audio = float(batches["delulu"]["attention_mask"].sum()) / 16000
            items, samples = batches["delulu"]["input_values"].shape
            for key, flops_config in (("delulu", config), ("hubert", hubert_flops_config)):
                step_s = statistics.median(times[key])
                flops = P.pretraining_flops(flops_config, samples, items)
                row[key] = {
                    "step_s": step_s,
                    "audio_seconds_per_second": audio / step_s,
                    "peak_memory_gib": memory[key],
                    "tflops_per_second": flops / step_s / 1e12,
                    "mfu": flops / step_s / peak if peak else None,
                    "timed_steps": len(times[key]),
                }
            row["items"], row["batch_seconds"] = items, audio
            row["throughput_vs_hubert"] = (
                row["delulu"]["audio_seconds_per_second"] / row["hubert"]["audio_seconds_per_second"]
            )
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)

    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(HERE), "runs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "gpu_step.json")
    with open(path, "w") as handle:
        json.dump(
            {"device": name, "peak_flops": peak, "torch": torch.__version__, "runs": rows}, handle, indent=2
        )
    print(f"wrote {path}")
    done = [r for r in rows if "error" not in r]
    for row in done:
        tag = f"{row['max_batch_samples'] // 1000}k"
        for key in ("delulu", "hubert"):
            print(f"RESULT gpu_{key}_base_bf16_step_seconds_{tag} {row[key]['step_s']:.3f} s")
            print(
                f"RESULT gpu_{key}_base_bf16_audio_seconds_per_second_{tag} {row[key]['audio_seconds_per_second']:.1f}"
            )
            print(f"RESULT gpu_{key}_base_bf16_peak_memory_gib_{tag} {row[key]['peak_memory_gib']:.1f} GiB")
    if done:
        headline = done[-1]
        if headline["delulu"]["mfu"] is not None:
            print(f"RESULT gpu_base_bf16_mfu {headline['delulu']['mfu']:.3f}")
        print(f"RESULT gpu_step_throughput_vs_hubert {headline['throughput_vs_hubert']:.3f} x")


if __name__ == "__main__":
    main()
