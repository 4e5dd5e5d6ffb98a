"""Features and trials in, speaker-verification results out: zero-shot cosine and a downstream x-vector head.

* ``zero_shot_verification``: cosine of time-mean features, every layer; EER, minDCF(0.01),
  minDCF(0.05) on held-out speakers' trials, and the scores for a DET curve.
* ``downstream_verification``: the SUPERB x-vector recipe (softmax-weighted layer sum, TDNN,
  mean+std pooling, AM-softmax s=30 m=0.4) trained on the training speakers' frozen frame
  features and scored on the same held-out trials. The head is the encoder's own x-vector class
  (``DeluluForXVector``, ``WavLMForXVector``, ...) when it has one, else transformers'
  ``Wav2Vec2ForXVector`` head.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from delulu_hf.evaluation.data import Trials
from delulu_hf.evaluation.encoders import Encoder, TransformersEncoder
from delulu_hf.evaluation.features import FeatureSet, l2_normalize
from delulu_hf.evaluation.metrics import compute_eer, compute_min_dcf, plot_det_curves
from delulu_hf.evaluation.report import plot_losses, summarise_layers

logger = logging.getLogger(__name__)

__all__ = ["downstream_verification", "verification_metrics", "zero_shot_verification"]


def verification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """EER (and its threshold), minDCF at p_target 0.01 and 0.05 of one set of trial scores."""
    eer, threshold = compute_eer(scores, labels)
    return {
        "eer": eer,
        "eer_threshold": threshold,
        "min_dcf_0.01": compute_min_dcf(scores, labels, p_target=0.01)[0],
        "min_dcf_0.05": compute_min_dcf(scores, labels, p_target=0.05)[0],
    }


def zero_shot_verification(
    features: FeatureSet,
    trials: Trials,
    output_dir: str | Path | None = None,
    seed: int | None = None,
    speaker_of: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Cosine scoring of time-mean features for every stream; EER and minDCF per layer.

    Returns the summary dict plus ``_curves`` (scores/labels of the last and best layers, used for
    the DET plot; removed before writing JSON).
    """
    enroll, test = features.rows(trials.enroll), features.rows(trials.test)
    labels = trials.target
    per_layer, scores_of = [], {}
    layers = tqdm(features.streams, desc="verification", unit="layer", disable=not progress)
    for k, stream in enumerate(layers):
        emb = l2_normalize(features.pooled[stream].astype(np.float64))
        scores = np.einsum("nd,nd->n", emb[enroll], emb[test])
        scores_of[stream] = scores
        per_layer.append({"layer": stream, "index": k, **verification_metrics(scores, labels)})
    result = summarise_layers(per_layer, features.primary, "eer", lower_is_better=True)
    files = trials.files()
    result.update(
        n_target=trials.n_target,
        n_nontarget=trials.n_nontarget,
        n_utterances=len(files),
        n_speakers=len({speaker_of[f] for f in files}) if speaker_of else None,
        trials=trials.source,
        seed=seed,
        scoring="cosine of time-mean features",
    )
    curves = {f"zero-shot {features.primary} (last)": (scores_of[features.primary], labels)}
    best_name = result["best_layer_name"]
    if best_name != features.primary:
        curves[f"zero-shot {best_name} (best)"] = (scores_of[best_name], labels)
    result["_curves"] = curves
    if output_dir is not None:
        path = plot_det_curves(
            curves, Path(output_dir) / "det_verification.png", title="Zero-shot verification"
        )
        result["det_curve"] = path.name
    return result


class _CachedHiddenStates(nn.Module):
    """Stands in for a frozen base model inside an x-vector head: returns cached hidden states.

    The x-vector classes run ``outputs = self.<base>(input_values, ...)`` and then read
    ``outputs.hidden_states`` / ``outputs.last_hidden_state``. Passing the cached, stacked states
    ``(batch, num_layers, frames, dim)`` as ``input_values`` lets the head's own forward run
    unchanged while the encoder, which is frozen anyway, is not re-run every epoch.
    """

    def forward(self, input_values: torch.Tensor, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        layers = tuple(input_values.unbind(dim=1))
        return BaseModelOutput(last_hidden_state=layers[-1], hidden_states=layers, attentions=None)


def _build_xvector_head(
    encoder: Encoder, num_layers: int, dim: int, num_labels: int, overrides: dict[str, Any] | None = None
) -> tuple[nn.Module, str]:
    """The encoder's own x-vector head when it has one, else transformers' Wav2Vec2ForXVector head.

    ``overrides`` replace head settings of the config (``tdnn_dim``, ``tdnn_kernel``,
    ``tdnn_dilation``, ``xvector_output_dim``); the defaults are the SUPERB / Wav2Vec2 ones.
    """
    overrides = dict(overrides or {})
    from transformers import MODEL_FOR_AUDIO_XVECTOR_MAPPING, AutoModelForAudioXVector, Wav2Vec2Config
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2ForXVector

    config = getattr(encoder, "config", None)
    if isinstance(encoder, TransformersEncoder) and type(config) in MODEL_FOR_AUDIO_XVECTOR_MAPPING:
        config = config.__class__.from_dict(config.to_dict())
        config.use_weighted_layer_sum = True
        config.num_labels = num_labels
        for key, value in overrides.items():
            setattr(config, key, value)
        model = AutoModelForAudioXVector.from_config(config)
    else:
        # The SUPERB recipe with Wav2Vec2's defaults; the tiny base it builds is replaced below.
        config = Wav2Vec2Config(
            hidden_size=dim,
            num_hidden_layers=num_layers - 1,
            num_attention_heads=1,
            intermediate_size=4,
            conv_dim=(4,),
            conv_stride=(1,),
            conv_kernel=(1,),
            num_conv_pos_embeddings=2,
            num_conv_pos_embedding_groups=1,
            use_weighted_layer_sum=True,
            num_labels=num_labels,
            **overrides,
        )
        model = Wav2Vec2ForXVector(config)
    prefix = model.base_model_prefix
    if not isinstance(getattr(model, prefix, None), nn.Module):
        raise TypeError(f"{type(model).__name__} has no base model attribute {prefix!r} to replace")
    setattr(model, prefix, _CachedHiddenStates())
    return model, type(model).__name__


def _tdnn_context(model: nn.Module) -> int:
    """Frames the TDNN stack consumes (sum of (kernel - 1) * dilation) plus two for a std."""
    config = model.config
    return sum((k - 1) * d for k, d in zip(config.tdnn_kernel, config.tdnn_dilation)) + 2


def _stack_frames(
    features: FeatureSet, row: int, streams: Sequence[str], start: int = 0, length: int | None = None
) -> np.ndarray:
    """``(layers, frames, dim)`` cached frames of one item, optionally the crop ``[start, start + length)``."""
    end = None if length is None else start + length
    return np.stack([features.item_frames(row, s)[start:end] for s in streams])


def downstream_verification(
    encoder: Encoder,
    features: FeatureSet,
    train_files: Sequence[str],
    speaker_of: dict[str, str],
    trials: Trials,
    output_dir: str | Path | None = None,
    seed: int = 0,
    epochs: int = 10,
    batch_size: int = 32,
    crop_seconds: float = 3.0,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    progress: bool = True,
    head_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train an x-vector head (AM-softmax) on training speakers' frozen frame features; score trials.

    ``features`` must hold frames for ``train_files`` and every trial file. Trials that involve a
    training speaker are dropped (and counted): test speakers must be unseen by the head.
    """
    if features.frames is None:
        raise ValueError("downstream verification needs features extracted with with_frames=True")
    streams = list(features.frame_streams)
    dims = {features.frames[s].shape[-1] for s in streams}
    if len(dims) != 1:  # a weighted layer sum needs equal widths; use the last frame stream
        streams = streams[-1:]
    dim = features.frames[streams[-1]].shape[-1]

    train_speakers = sorted({speaker_of[f] for f in train_files})
    keep = np.array(
        [
            speaker_of[a] not in train_speakers and speaker_of[b] not in train_speakers
            for a, b in zip(trials.enroll, trials.test)
        ]
    )
    n_dropped = int((~keep).sum())
    trials = trials.subset(keep)
    if trials.n_target == 0 or trials.n_nontarget == 0:
        raise ValueError("no held-out trials left after removing trials with training speakers")
    if len(train_speakers) < 2:
        raise ValueError(f"downstream verification needs >= 2 training speakers, got {len(train_speakers)}")

    torch.manual_seed(seed)
    model, head_name = _build_xvector_head(encoder, len(streams), dim, len(train_speakers), head_overrides)
    model.to(device).train()
    context = _tdnn_context(model)
    hop = encoder.frame_hop_seconds
    crop = max(context, round(crop_seconds / hop))
    label_of = {s: i for i, s in enumerate(train_speakers)}
    train_rows = features.rows(train_files)
    lengths = np.diff(features.offsets)
    usable = [r for r in train_rows if lengths[r] >= context]
    if len(usable) < len(train_rows):
        logger.warning(
            "%d training item(s) shorter than the TDNN context skipped", len(train_rows) - len(usable)
        )
    key_of = features.keys
    labels_all = np.array([label_of[speaker_of[key_of[r]]] for r in usable])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    steps_per_epoch = math.ceil(len(usable) / batch_size)
    bar = tqdm(total=epochs * steps_per_epoch, desc="x-vector head", unit="step", disable=not progress)
    for _ in range(epochs):
        order = rng.permutation(len(usable))
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            rows = [usable[i] for i in idx]
            length = min(crop, *(int(lengths[r]) for r in rows))
            batch = []
            for r in rows:
                start = int(rng.integers(0, lengths[r] - length + 1))
                batch.append(_stack_frames(features, r, streams, start, length))
            inputs = torch.from_numpy(np.stack(batch)).float().to(device)
            labels = torch.from_numpy(labels_all[idx]).to(device)
            loss = model(input_values=inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()

    model.eval()
    test_files = trials.files()
    embeddings = {}
    with torch.inference_mode():
        for f in test_files:
            frames = _stack_frames(features, int(features.rows([f])[0]), streams)
            if frames.shape[1] < context:  # shorter than the TDNN's context: tile it so pooling has frames
                frames = np.tile(frames, (1, math.ceil(context / frames.shape[1]), 1))
            emb = model(input_values=torch.from_numpy(frames[None]).float().to(device)).embeddings
            embeddings[f] = emb[0].cpu().numpy()
    enroll = l2_normalize(np.stack([embeddings[f] for f in trials.enroll]).astype(np.float64))
    test = l2_normalize(np.stack([embeddings[f] for f in trials.test]).astype(np.float64))
    scores = np.einsum("nd,nd->n", enroll, test)
    result: dict[str, Any] = {
        **verification_metrics(scores, trials.target),
        "n_target": trials.n_target,
        "n_nontarget": trials.n_nontarget,
        "n_trials_dropped_training_speaker": n_dropped,
        "n_train_speakers": len(train_speakers),
        "n_train_utterances": len(usable),
        "head": head_name,
        "layers": streams,
        "epochs": epochs,
        "steps": len(losses),
        "batch_size": batch_size,
        "crop_seconds": crop * hop,
        "lr": lr,
        "final_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else None,
        "trials": trials.source,
        "seed": seed,
    }
    if getattr(model.config, "use_weighted_layer_sum", False) and hasattr(model, "layer_weights"):
        weights = torch.softmax(model.layer_weights.detach().float().cpu(), dim=-1).tolist()
        result["layer_weights"] = dict(zip(streams, weights))
    result["_curves"] = {f"downstream {head_name}": (scores, trials.target)}
    if output_dir is not None and losses:
        result["loss_curve"] = plot_losses(losses, Path(output_dir) / "downstream_loss.png").name
    return result
