#!/usr/bin/env python
"""Pretrain DELULU: masked prediction of speaker-feature clusters + denoising.

    accelerate launch training/pretrain.py                      # the demo run (training/configs/demo.yaml)
    accelerate launch --config_file training/configs/accelerate/4xh100_ddp.yaml \\
        training/pretrain.py --config training/configs/base_4xh100.yaml --dataset DATA
    python training/pretrain.py --max_steps 20 --output_dir runs/try1 --save_steps 10

Every field of ``delulu_hf.pretraining.PretrainConfig`` is a ``--field value`` flag on top of the
YAML file (``--model.hidden_size 256`` for model fields). A run resumes from the newest complete
checkpoint in ``output_dir`` (``--resume_from_checkpoint latest``, the default) and ends with a
``save_pretrained`` folder at ``output_dir/final``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from tqdm.auto import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from delulu_hf import DeluluForPreTraining  # noqa: E402
from delulu_hf import pretraining as P  # noqa: E402

logger = logging.getLogger("pretrain")


def main(argv: list[str] | None = None) -> str:
    cfg = P.parse_config(argv, default_config=os.path.join(REPO, "training", "configs", "demo.yaml"))
    cfg = P.resolve_paths(cfg, REPO)
    model_config = P.build_model_config(cfg)
    find_unused = cfg.ddp_find_unused_parameters
    # Several processes and no GPU (torchrun / `accelerate launch --multi_gpu` on a CPU machine): tell
    # accelerate to use CPU DDP (gloo), which it otherwise only does under `--cpu` + mpirun.
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu_ddp,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard" if cfg.report_to == "tensorboard" else None,
        project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,  # our schedule counts optimizer updates, once each
        kwargs_handlers=[
            DistributedDataParallelKwargs(
                find_unused_parameters=model_config.layerdrop > 0 if find_unused is None else find_unused
            )
        ],
    )
    if accelerator.mixed_precision == "fp16":
        raise ValueError("fp16 is not supported (its loss scaler makes inf gradients on purpose): use bf16")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    if accelerator.is_main_process and cfg.overwrite_output_dir:
        shutil.rmtree(cfg.output_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.allow_tf32

    # Labels (made and cached on the first run), then the model, identical on every process.
    data = P.prepare_pretraining_dataset(cfg, model_config)
    set_seed(cfg.seed)
    model = DeluluForPreTraining(model_config)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer, scheduler = P.build_optimizer_and_scheduler(
        model, cfg, fused=accelerator.device.type == "cuda"
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    set_seed(cfg.seed, device_specific=True)  # dropout/layerdrop streams differ per process

    # Resume: model, optimizer, scheduler, RNG (accelerate) + step, data position, guard (ours).
    guard = P.NonFiniteGuard(cfg.max_consecutive_nonfinite)
    step, position = 0, (0, 0)
    if accelerator.is_main_process:
        P.remove_incomplete_checkpoints(cfg.output_dir)
    accelerator.wait_for_everyone()
    resume = P.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    if resume:
        state = P.load_checkpoint(accelerator, resume)
        P.check_resumable(state, cfg, model_config, accelerator.num_processes)
        step, position = state["step"], tuple(state["position"])
        guard.load_state_dict(state["nonfinite"])
        logger.info("Resumed from %s (step %d, epoch %d, batch %d)", resume, step, *position)
    loader, sampler = P.make_dataloader(
        data, model_config, cfg, accelerator.num_processes, accelerator.process_index, start=position
    )
    batches = iter(loader)

    metrics_log = P.MetricsLog(cfg.output_dir, resume_step=step, enabled=accelerator.is_main_process)
    if cfg.report_to == "tensorboard":
        accelerator.init_trackers("pretrain", config=P.flat_hparams(cfg, model_config))
    meter = P.RunningMetrics(
        model_config, accelerator.device, P.peak_flops_per_second(accelerator.device, cfg.peak_flops)
    )
    progress = tqdm(
        total=cfg.max_steps, initial=step, desc="pretrain", disable=not accelerator.is_local_main_process
    )
    model.train()
    while step < cfg.max_steps:
        # One optimizer update = gradient_accumulation_steps micro-batches on every process.
        nonfinite = torch.zeros((), device=accelerator.device)
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            # Where the global batch stream continues after this round (saved with checkpoints).
            first_of_round = batch.pop("batch_index") - accelerator.process_index
            position = sampler.advance((batch.pop("epoch"), first_of_round), accelerator.num_processes)
            batch = {
                k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items() if v is not None
            }
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out.loss)
            nonfinite += ~torch.isfinite(out.loss.detach())
            meter.add(out, batch)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
        finite = accelerator.reduce(nonfinite, reduction="sum") == 0 and math.isfinite(float(grad_norm))
        if guard.check(bool(finite), step + 1):  # else skip the update (counted; N in a row aborts)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the rate this update used
        scheduler.step()  # also after a skipped update, so step N always has the same learning rate
        step += 1
        progress.update(1)

        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            record = {"step": step, **meter.summary(accelerator), "lr": lr, "grad_norm": float(grad_norm)}
            record.update(nonfinite_skipped=guard.total, epoch=position[0])
            accelerator.log(record, step=step)
            metrics_log.write(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['masked_accuracy']:.3f}")

        if step % cfg.save_steps == 0 or step == cfg.max_steps:
            state = P.trainer_state(step, position, guard, cfg, model_config, accelerator.num_processes)
            P.save_checkpoint(accelerator, cfg.output_dir, step, state, cfg.save_total_limit)
    progress.close()

    accelerator.wait_for_everyone()
    final = os.path.join(cfg.output_dir, "final")
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP/DeepSpeed shards (all processes)
    if accelerator.is_main_process:
        final = P.save_final_model(accelerator.unwrap_model(model), cfg.output_dir, cfg, data, state_dict)
        plot = metrics_log.plot()
        print(f"Pretrained DELULU saved to {os.path.abspath(final)}")
        if plot:
            print(f"Loss curves: {os.path.abspath(plot)}; metrics: {os.path.abspath(metrics_log.path)}")
    accelerator.end_training()
    return final


if __name__ == "__main__":
    main()
