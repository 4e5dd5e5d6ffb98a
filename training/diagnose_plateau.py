#!/usr/bin/env python
"""Why does the demo student stay at the label prior? One short training run in, a JSON line of diagnostics out.

    OMP_NUM_THREADS=1 python training/diagnose_plateau.py --objective supervised --steps 400
    OMP_NUM_THREADS=1 python training/diagnose_plateau.py --objective masked \\
        --labels runs/replicate/labels/redimnet --steps 400 --model.conv_bias true

The run uses the project's own pieces exactly as ``training/pretrain.py`` does (the demo config, its
``LengthBucketBatchSampler`` batches, ``DeluluPretrainingCollator`` crops/corruption/span masks,
``build_optimizer_and_scheduler``, clipping), so what it finds holds for the shipped loop; only the
objective differs:

* ``masked``: the pretraining loss on a ``prepare_labels.py`` folder's cluster ids (what
  ``pretrain.py`` optimises); reports masked-frame accuracy against the largest cluster's share
  (the accuracy of predicting the prior);
* ``supervised``: softmax over the training speakers on the mean-pooled last layer, no span mask:
  the ceiling this student reaches in the same steps when the targets are the answer itself;
* ``distill``: regression onto the teacher's frame features (``delulu_hf.pretraining.distill``);
* ``visible``: the cluster id of every *visible* frame (no span mask): whether the front end can
  learn the targets from the frame itself, with no context to infer.

Every run also logs the gradient norm before clipping and the share of it in the conv front end's
layer-norm biases (the silence pathology described in ``results/small_scale/README.md``), and ends
with the zero-shot EER of the last layer on the held-out demo speakers
(``delulu_hf.evaluation.run_evaluation``, the numbers ``training/evaluate.py`` reports).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from delulu_hf.cli import ArgumentParser, main_entry  # noqa: E402


@dataclass
class DiagnoseArguments:
    objective: str = field(
        default="masked", metadata={"help": "'masked', 'supervised', 'distill' or 'visible'"}
    )
    labels: str = field(
        default="runs/replicate/labels/redimnet", metadata={"help": "a prepare_labels.py --output folder"}
    )
    steps: int = field(default=400, metadata={"help": "optimizer updates"})
    seed: int = field(default=0, metadata={"help": "model init, batches, crops, masks"})
    pretrain_config: str = field(
        default="training/configs/demo.yaml", metadata={"help": "the pretrain config"}
    )
    learning_rate: float | None = field(default=None, metadata={"help": "none: the config's"})
    warmup_steps: int | None = field(default=None, metadata={"help": "none: same fraction as the config's"})
    max_grad_norm: float | None = field(default=None, metadata={"help": "none: the config's"})
    adam_epsilon: float | None = field(default=None, metadata={"help": "none: the config's"})
    weight_decay: float | None = field(default=None, metadata={"help": "none: the config's"})
    max_batch_samples: int | None = field(default=None, metadata={"help": "none: the config's"})
    max_sample_length: int | None = field(default=None, metadata={"help": "none: the config's"})
    model: dict = field(default_factory=dict, metadata={"help": "DeluluConfig overrides, --model.key value"})
    teacher: str = field(default="data/demo_teacher", metadata={"help": "teacher of the distill objective"})
    eval: bool = field(default=True, metadata={"help": "zero-shot EER on the held-out speakers at the end"})
    log_every: int = field(default=50, metadata={"help": "print a progress line every N steps"})
    output: str | None = field(default=None, metadata={"help": "append the result line to this JSONL file"})
    tag: str = field(default="", metadata={"help": "a name for the run in the output"})


def _pretrain_config(args: DiagnoseArguments):
    from delulu_hf import pretraining as P

    cfg = P.parse_config(["--config", os.path.join(REPO, args.pretrain_config)])
    base_steps, base_warmup = cfg.max_steps, cfg.warmup_steps
    cfg.max_steps = args.steps
    cfg.warmup_steps = (
        args.warmup_steps
        if args.warmup_steps is not None
        else max(1, round(args.steps * base_warmup / base_steps))
    )
    for name in ("learning_rate", "max_grad_norm", "adam_epsilon", "weight_decay"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    for name in ("max_batch_samples", "max_sample_length"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.max_sample_length = min(cfg.max_sample_length, cfg.max_batch_samples)
    cfg.min_sample_length = min(cfg.min_sample_length, cfg.max_sample_length)
    cfg.model = {**cfg.model, **args.model}
    cfg.seed = args.seed
    return cfg


class _Items:
    """The labelled training split in memory: waveforms, cluster ids and speaker ids."""

    def __init__(self, folder: str):
        import datasets

        data = datasets.load_from_disk(os.path.join(folder, "dataset")).with_format("numpy")
        self.waves = [np.asarray(a["array"], dtype=np.float32) for a in data["audio"]]
        self.ids = [np.asarray(c, dtype=np.int64) for c in data["cluster_ids"]]
        self.names = list(data["file_name"])
        speakers = sorted(set(data["speaker_id"]))
        self.speaker = np.array([speakers.index(s) for s in data["speaker_id"]])
        self.num_speakers = len(speakers)
        counts = np.bincount(np.concatenate(self.ids))
        self.largest_share = float(counts.max() / counts.sum())


def _front_end_ln_bias_share(model: torch.nn.Module) -> tuple[float, float]:
    """(total gradient norm, share of its square in the conv front end's layer-norm biases)."""
    total = front = 0.0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        sq = float(param.grad.detach().float().pow(2).sum())
        total += sq
        if "feature_extractor" in name and "layer_norm.bias" in name:
            front += sq
    return math.sqrt(total), (front / total if total > 0 else 0.0)


def zero_shot_eer(model, name: str) -> dict[str, float]:
    """Last-layer and best-layer zero-shot EER on the demo corpus's held-out trials."""
    from delulu_hf.evaluation import run_evaluation
    from delulu_hf.evaluation.encoders import TransformersEncoder

    encoder = TransformersEncoder.from_model(model, name=name)
    with tempfile.TemporaryDirectory() as out:
        results = run_evaluation(
            model=name,
            data=os.path.join(REPO, "data", "demo_corpus"),
            output=out,
            tasks=["verification"],
            encoder=encoder,
            cache_dir=None,
            progress=False,
        )
    v = results["tasks"]["verification"]
    return {"eer_last": v["eer"], "eer_best": v["best_layer_eer"], "best_layer": v["best_layer_name"]}


def run(args: DiagnoseArguments) -> dict:
    from delulu_hf import DeluluForPreTraining
    from delulu_hf import pretraining as P
    from delulu_hf.augment import NoiseSource

    torch.manual_seed(args.seed)
    cfg = _pretrain_config(args)
    items = _Items(os.path.join(REPO, args.labels) if not os.path.isabs(args.labels) else args.labels)
    model_config = P.build_model_config(cfg, num_clusters=int(max(int(i.max()) for i in items.ids) + 1))
    model_config.num_clusters = max(model_config.num_clusters, 2)
    if args.objective == "supervised":  # no cluster ids needed: placeholders fit any conv stack
        from delulu_hf import feat_extract_output_lengths

        items.ids = [
            np.zeros(feat_extract_output_lengths(model_config, len(w)), dtype=np.int64) for w in items.waves
        ]
    torch.manual_seed(args.seed)
    model = DeluluForPreTraining(model_config)
    head = None
    if args.objective == "supervised":
        head = torch.nn.Linear(model_config.hidden_size, items.num_speakers)
        model.speaker_head = head  # so the optimizer and clipping see it
    distiller = None
    if args.objective == "distill":
        from delulu_hf.pretraining.distill import TeacherTargets

        teacher = os.path.join(REPO, args.teacher) if not os.path.isabs(args.teacher) else args.teacher
        if model_config.distill_dim is None:
            from delulu_hf.labels import load_featurizer

            model_config.distill_dim = int(
                load_featurizer(teacher, output=model_config.distill_target).feature_dim
            )
        model_config.distill_loss_weight = model_config.distill_loss_weight or 1.0
        distiller = TeacherTargets.build(teacher, model_config)
        spread = np.unique(np.linspace(0, len(items.waves) - 1, 400).astype(int))
        distiller.fit_statistics([items.waves[i] for i in spread])
        torch.manual_seed(args.seed)
        model = DeluluForPreTraining(model_config)  # with its distillation head
    optimizer, scheduler = P.build_optimizer_and_scheduler(model, cfg)
    lengths = [min(len(w), cfg.max_sample_length) for w in items.waves]
    sampler = P.LengthBucketBatchSampler(lengths, cfg.max_batch_samples, seed=args.seed)
    collator = P.DeluluPretrainingCollator(
        model_config,
        cfg.max_sample_length,
        noise=NoiseSource(os.path.join(REPO, "data", "demo_noise")),
        normalize_audio=cfg.normalize_audio,
        keep_clean=distiller is not None,
    )
    model.train()
    stream = iter(sampler)
    history, started = [], time.time()
    window = {"correct": 0, "count": 0, "loss": 0.0, "n": 0, "grad": [], "front": [], "clipped": 0}
    for step in range(1, args.steps + 1):
        planned = next(stream)
        batch_items = [
            {
                "input_values": items.waves[i],
                "labels": items.ids[i],
                "seed": seed,
                "epoch": epoch,
                "batch_index": index,
                "name": items.names[i],
            }
            for i, seed, epoch, index in planned
        ]
        batch = collator(batch_items)
        speakers = torch.as_tensor(items.speaker[[i for i, *_ in planned]])
        batch.pop("epoch"), batch.pop("batch_index")
        if args.objective == "visible":
            out = model(
                batch["input_values"],
                attention_mask=batch["attention_mask"],
                mask_time_indices=torch.zeros_like(batch["labels"], dtype=torch.bool),
            )
            real = batch["labels"] != -100
            loss = F.cross_entropy(out.logits[real], batch["labels"][real])
            window["correct"] += int((out.logits[real].argmax(-1) == batch["labels"][real]).sum())
            window["count"] += int(real.sum())
        elif args.objective == "supervised":
            out = model.delulu(
                batch["input_values"],
                attention_mask=batch["attention_mask"],
                mask_time_indices=torch.zeros_like(batch["labels"], dtype=torch.bool),
            )
            frame_mask = (batch["labels"] != -100).float()[..., None]
            pooled = (out.last_hidden_state * frame_mask).sum(1) / frame_mask.sum(1)
            logits = head(pooled)
            loss = F.cross_entropy(logits, speakers)
            window["correct"] += int((logits.argmax(-1) == speakers).sum())
            window["count"] += len(speakers)
        else:
            if distiller is not None:
                batch = distiller.attach(batch)
            out = model(**batch)
            loss = out.loss
            if distiller is not None:  # accuracy column: mean cosine to the targets
                window["correct"] += float(out.distill_cosine_sum)
                window["count"] += int(out.distill_count)
            else:
                window["correct"] += int(out.masked_correct)
                window["count"] += int(out.masked_count)
        loss.backward()
        grad, front = _front_end_ln_bias_share(model)
        clip = cfg.max_grad_norm or math.inf
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        window["clipped"] += int(grad > clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        window["loss"] += float(loss.detach())
        window["n"] += 1
        window["grad"].append(grad)
        window["front"].append(front)
        if step % args.log_every == 0 or step == args.steps:
            record = {
                "step": step,
                "loss": window["loss"] / window["n"],
                "accuracy": window["correct"] / max(window["count"], 1),
                "grad_norm_median": float(np.median(window["grad"])),
                "grad_norm_max": float(np.max(window["grad"])),
                "front_ln_bias_share_median": float(np.median(window["front"])),
                "clipped_fraction": window["clipped"] / window["n"],
                "seconds": round(time.time() - started, 1),
            }
            history.append(record)
            print(json.dumps(record), flush=True)
            window = {"correct": 0, "count": 0, "loss": 0.0, "n": 0, "grad": [], "front": [], "clipped": 0}
    result = {
        "tag": args.tag,
        "objective": args.objective,
        "labels": args.labels if args.objective != "supervised" else None,
        "steps": args.steps,
        "seed": args.seed,
        "learning_rate": cfg.learning_rate,
        "warmup_steps": cfg.warmup_steps,
        "max_batch_samples": cfg.max_batch_samples,
        "max_sample_length": cfg.max_sample_length,
        "model_overrides": args.model,
        "largest_cluster_share": items.largest_share if args.objective in ("masked", "visible") else None,
        "final": history[-1],
        "train_seconds": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    if args.eval:
        model.eval()
        result.update(zero_shot_eer(model.delulu, args.tag or "diagnose"))
    return result


def main(argv: list[str] | None = None) -> int:
    args = ArgumentParser(DiagnoseArguments, prog="diagnose_plateau.py", description=__doc__).parse_one(argv)
    if args.objective not in ("masked", "supervised", "distill", "visible"):
        raise SystemExit(
            f"--objective must be masked, supervised, distill or visible, got {args.objective!r}"
        )
    result = run(args)
    line = json.dumps(result)
    print("RESULT " + line, flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    main_entry(main)
