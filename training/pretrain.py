#!/usr/bin/env python
"""Pretrain DELULU: masked prediction of speaker-feature clusters + denoising.

    accelerate launch training/pretrain.py                      # the demo run (training/configs/demo.yaml)
    accelerate launch --config_file training/configs/accelerate/4xh100_ddp.yaml \\
        training/pretrain.py --config training/configs/base_4xh100.yaml --dataset DATA
    python training/pretrain.py --max_steps 20 --output_dir runs/try1 --save_steps 10

Every field of ``delulu_hf.pretraining.PretrainConfig`` is a ``--field value`` flag on top of the
YAML file (``--model.hidden_size 256`` for model fields, ``--adam_betas 0.9 0.98``); ``--help`` lists
them with the default config's values, and a wrong flag or value is one line on stderr (exit code 2).
A run resumes from the newest complete checkpoint in ``output_dir`` (``--resume_from_checkpoint
latest``, the default) and ends with a ``save_pretrained`` folder at ``output_dir/final``.

``--dataset`` takes a ``training/prepare_labels.py --output OUT`` folder as written: the model config's
``num_clusters`` and label fields then come from its ``labels.json`` (a value you set that disagrees
stops the run before anything is built, saying how to fix it). Every path is checked before any model
is loaded or the output folder is touched. A bad item (undecodable, empty, too short, non-finite,
labels that do not fit its frames) stops the run naming it; ``--on_error skip`` leaves such items out,
each named once in the log and counted in ``metrics.jsonl`` and ``final/training_config.json``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from delulu_hf import DeluluForPreTraining  # noqa: E402
from delulu_hf import pretraining as P  # noqa: E402
from delulu_hf.cli import is_rank_zero, main_entry  # noqa: E402
from delulu_hf.errors import UserError  # noqa: E402
from delulu_hf.pretraining import distill as D  # noqa: E402

logger = logging.getLogger("pretrain")


def main(argv: list[str] | None = None) -> None:
    cfg = P.parse_config(
        argv, default_config=os.path.join(REPO, "training", "configs", "demo.yaml"), description=__doc__
    )
    cfg = P.resolve_paths(cfg, REPO)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if is_rank_zero() else logging.WARNING,  # what every process does alike: once
    )
    # Every path, the checkpoint to resume from and the labels' provenance are checked before anything
    # is built or written; the model config's label fields follow the labels (conflicts stop here).
    source = P.check_inputs(cfg)
    model_config = P.build_model_config(cfg)
    P.apply_label_fields(model_config, cfg, source.fields, source.origin)
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
        raise UserError("fp16 is not supported (its loss scaler makes inf gradients on purpose): use bf16")
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        logger.warning(
            "DeepSpeed clips and steps inside backward: non-finite updates are counted, not skipped, "
            "and max_grad_norm comes from the DeepSpeed config"
        )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.allow_tf32

    # Labels (made and cached on the first run), then the model, identical on every process.
    data = P.prepare_pretraining_dataset(cfg, model_config, source)
    skipped = data.skipped  # the ledger of bad items: on_error=raise stops at the first, skip counts them
    if accelerator.is_main_process and cfg.overwrite_output_dir:  # only once the data is known to be good
        shutil.rmtree(cfg.output_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    distiller = D.setup_distillation(cfg, model_config, data, accelerator)  # None: distill_loss_weight 0
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
        skipped.load_training_items(state.get("skipped_in_training", []))
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
    model.train()
    unwrapped = accelerator.unwrap_model(model)
    # The bar is closed on any exit (a bad item under on_error=raise too): an error is the last line.
    with tqdm(
        total=cfg.max_steps, initial=step, desc="pretrain", disable=not accelerator.is_local_main_process
    ) as progress:
        while step < cfg.max_steps:
            # One optimizer update = gradient_accumulation_steps micro-batches on every process.
            micro_batches = []
            for _ in range(cfg.gradient_accumulation_steps):
                batch = next(batches)
                for name, reason in batch.pop("skipped"):  # bad items met on the fly, replaced from the plan
                    skipped.add(name, reason, "training")
                # Where the global batch stream continues after this round (saved with checkpoints).
                first_of_round = batch.pop("batch_index") - accelerator.process_index
                position = sampler.advance((batch.pop("epoch"), first_of_round), accelerator.num_processes)
                micro_batches.append(batch if distiller is None else distiller.attach(batch))
            # on_error=raise: every process stops on a bad item one of them met (one line, exit 2).
            skipped.raise_if_any(accelerator)
            # The loss is normalised by the frames of the whole update (all micro-batches and processes).
            frames = P.count_update_frames(micro_batches, accelerator)
            distill_frames = D.distill_update_frames(micro_batches, accelerator) if distiller else 0.0
            update_loss = torch.zeros((), device=accelerator.device)
            for micro_step, batch in enumerate(micro_batches):
                batch = {
                    k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items() if v is not None
                }
                # Every process skips the same layers (FSDP/DeepSpeed gather each layer on every rank).
                unwrapped.set_layerdrop_seed(P.layerdrop_seed(cfg.seed, step, micro_step))
                with accelerator.accumulate(model):
                    out = model(**batch)
                    loss, share = P.micro_batch_loss(
                        out, frames, model_config, cfg.gradient_accumulation_steps, accelerator.num_processes
                    )
                    if distiller is not None:  # + the regression term (per distilled frame of the update)
                        loss, share = distiller.add_loss(loss, share, out, distill_frames, cfg, accelerator)
                    accelerator.backward(loss)
                update_loss += share
                meter.add(out, batch)
            update_loss = accelerator.reduce(update_loss, reduction="sum")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
            finite = bool(torch.isfinite(update_loss)) and math.isfinite(float(grad_norm))
            if guard.check(bool(finite), step + 1):  # else skip the update (counted; N in a row aborts)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]  # the rate this update used
            scheduler.step()  # also after a skipped update, so step N always has the same learning rate
            step += 1
            progress.update(1)

            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                record = {"step": step, **meter.summary(accelerator), "lr": lr, "grad_norm": float(grad_norm)}
                if distiller is not None:
                    distiller.log(record, accelerator)
                skipped.sync(accelerator)
                record.update(nonfinite_skipped=guard.total, epoch=position[0], items_skipped=len(skipped))
                accelerator.log(record, step=step)
                metrics_log.write(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['masked_accuracy']:.3f}")

            if step % cfg.save_steps == 0 or step == cfg.max_steps:
                skipped.sync(accelerator)
                state = P.trainer_state(
                    step, position, guard, cfg, model_config, accelerator.num_processes, skipped
                )
                P.save_checkpoint(accelerator, cfg.output_dir, step, state, cfg.save_total_limit)

    accelerator.wait_for_everyone()
    final = os.path.join(cfg.output_dir, "final")
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP/DeepSpeed shards (all processes)
    if accelerator.is_main_process:
        final = P.save_final_model(accelerator.unwrap_model(model), cfg.output_dir, cfg, data, state_dict)
        if distiller is not None:
            distiller.save(final)  # the targets' statistics and provenance beside the weights
        plot = metrics_log.plot()
        print(f"Pretrained DELULU saved to {os.path.abspath(final)}")
        if plot:
            print(f"Loss curves: {os.path.abspath(plot)}; metrics: {os.path.abspath(metrics_log.path)}")
    accelerator.end_training()


if __name__ == "__main__":
    main_entry(main)
