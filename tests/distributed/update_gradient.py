"""Test-only entry point: one optimizer update of a tiny DELULU, as ``training/pretrain.py`` does it.

Run as ``python update_gradient.py OUT ACCUMULATION`` (one process) or under ``accelerate launch
--multi_gpu --num_processes N`` (CPU gloo DDP). The global micro-batch stream is fixed: micro-batch
``k`` of the update goes to process ``k // ACCUMULATION``, so every layout (processes x accumulation)
sees the same items. Rank 0 writes the synchronised gradient to ``OUT/grads.safetensors``, and
``OUT/layerdrop.json`` holds, per process, which encoder layers ran in each micro-step of a model
with layerdrop 0.5 (``pretrain.py`` seeds LayerDrop per update step and micro-step).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from delulu_hf import DeluluConfig, DeluluForPreTraining, feat_extract_output_lengths
from delulu_hf import pretraining as P

LENGTHS = [(16000, 16000, 12000), (6000, 5000), (24000,), (9000, 9000, 9000, 4000)]  # 4 micro-batches


def tiny_config(**overrides) -> DeluluConfig:
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=48,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        num_clusters=12,
        final_dim=8,
        layerdrop=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        denoise_loss_weight=0.5,
        denoise_corruption_prob=0.5,
        feature_penalty_weight=10.0,
    )
    kwargs.update(overrides)
    return DeluluConfig(**kwargs)


def micro_batches(config: DeluluConfig) -> list[dict]:
    collator = P.DeluluPretrainingCollator(config, max_sample_length=24000)
    out = []
    for k, lengths in enumerate(LENGTHS):
        rng = np.random.default_rng(k)
        items = []
        for i, n in enumerate(lengths):
            envelope = 0.2 + (np.sin(np.arange(n) / 400.0) > 0)  # speech-like bursts, never exact silence
            wave = (0.1 * rng.standard_normal(n) * envelope).astype(np.float32)
            labels = rng.integers(0, config.num_clusters, feat_extract_output_lengths(config, n))
            items.append({"input_values": wave, "labels": labels, "name": f"{k}/{i}", "seed": 100 + k})
            items[-1].update(epoch=0, batch_index=k)
        batch = collator(items)
        batch.pop("epoch"), batch.pop("batch_index")
        out.append({key: value for key, value in batch.items() if value is not None})
    return out


def main() -> None:
    out_dir, accumulation = sys.argv[1], int(sys.argv[2])
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=cpu_ddp, gradient_accumulation_steps=accumulation)
    rank, processes = accelerator.process_index, accelerator.num_processes
    assert processes * accumulation == len(LENGTHS), (processes, accumulation)
    config = tiny_config()
    torch.manual_seed(0)
    model = accelerator.prepare(DeluluForPreTraining(config).train())
    mine = micro_batches(config)[rank * accumulation : (rank + 1) * accumulation]

    # The update, exactly as the loop in training/pretrain.py runs it.
    frames = P.count_update_frames(mine, accelerator)
    update_loss = torch.zeros(())
    for micro_step, batch in enumerate(mine):
        accelerator.unwrap_model(model).set_layerdrop_seed(P.layerdrop_seed(0, 0, micro_step))
        with accelerator.accumulate(model):
            out = model(**batch)
            loss, share = P.micro_batch_loss(out, frames, config, accumulation, processes)
            accelerator.backward(loss)
        update_loss += share
    update_loss = accelerator.reduce(update_loss, reduction="sum")
    grads = {name: p.grad.detach().clone() for name, p in accelerator.unwrap_model(model).named_parameters()}

    # Which layers LayerDrop skips, per process and micro-step.
    torch.manual_seed(1000 + rank)  # the global RNG differs per process, as after set_seed(device_specific)
    dropping = DeluluForPreTraining(tiny_config(num_hidden_layers=8, layerdrop=0.5)).train()
    patterns = []
    for micro_step in range(6):
        dropping.set_layerdrop_seed(P.layerdrop_seed(0, 3, micro_step))
        patterns.append(dropping.delulu.encoder.layerdrop_skips())
    gathered = [None] * processes
    if processes > 1:
        torch.distributed.all_gather_object(gathered, patterns)
    else:
        gathered = [patterns]

    if accelerator.is_main_process:
        os.makedirs(out_dir, exist_ok=True)
        save_file(
            {**grads, "update_loss": update_loss.reshape(1)}, os.path.join(out_dir, "grads.safetensors")
        )
        with open(os.path.join(out_dir, "layerdrop.json"), "w") as handle:
            json.dump(gathered, handle)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
