"""ReDimNet (Yakovlev et al., Interspeech 2024, arXiv 2407.18223): the speaker model whose frame-level
features DELULU clusters into pseudo-labels.

Written from the architecture description and from reading the official MIT-licensed code
(github.com/IDRnD/ReDimNet) to learn its checkpoint layout. Parameter and buffer names follow the official
``ReDimNetWrap`` state dict (``spec.*``, ``backbone.*``, ``pool.*``, ``bn.*``, ``linear.*``) so an official
``{"model_config": ..., "state_dict": ...}`` checkpoint loads strictly, with no renaming table to maintain.

Reading order (data order): mel frontend -> 2D blocks -> 1D time-context blocks -> stage weighting ->
backbone -> pooling -> ``ReDimNet`` (the teacher, with presets and checkpoint I/O).

What differs from the official code (same weights give the same outputs, see ``tests/test_redimnet.py``):

* Padded batches. Every op that looks along time (convs with temporal kernels, attention, the fwSE
  time mean, the mel mean subtraction, pooling) only sees an item's valid frames, and the STFT
  reflect-pads each item at its own end. A padded item therefore gives the features of its unpadded run;
  the official code mixes padding into all of these.
* Speed. Stage weighting sums the earlier outputs in place instead of stacking them; attention uses
  ``scaled_dot_product_attention``; the global-context pooling adds the context as a per-item bias
  instead of concatenating three copies of the features; masks are skipped when nothing is padded.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from delulu_hf.atomic import atomic_write
from delulu_hf.teacher.base import SpeakerTeacher

__all__ = [
    "PRESETS",
    "CheckpointMismatchError",
    "ReDimNet",
    "ReDimNetConfig",
    "ReDimNetWindowEmbeddings",
    "load_teacher",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# A stage is (frequency stride, number of 2D blocks, channel expansion of the 2D blocks, kernel sizes
# (unused by the official code, kept for layout compatibility), reduction of the 1D block or None).
Stage = tuple[int, int, int, list, Union[int, None]]

# The default of the official ``ReDimNetWrap`` (its "M" setup). A checkpoint whose model_config omits
# ``stages_setup`` was built with this, so our default must equal it.
_OFFICIAL_DEFAULT_STAGES: list[Stage] = [
    (1, 2, 1, [(3, 3)], 12),
    (2, 2, 1, [(3, 3)], 12),
    (1, 3, 1, [(3, 3)], 12),
    (2, 4, 1, [(3, 3)], 8),
    (1, 4, 1, [(3, 3)], 8),
    (2, 4, 1, [(3, 3)], 4),
]

# Model sizes B0-B6. Official checkpoints carry their own model_config (which wins); these presets are
# for training from scratch and were chosen so that the parameter counts match the paper (Table 2):
# B0 1.0 M, B1 2.2 M, B2 4.7 M, B3 3.0 M, B4 6.3 M, B5 9.2 M, B6 15.0 M. B0, B4 and B6 follow
# wespeaker's ReDimNet recipes and B2/B5 the authors' named configurations with the paper's GMACs;
# B1 (group divisor 12, global context) and B3 (no global context) are adjusted from wespeaker's
# recipes, which are 13% and 7.5% off the published sizes. Frame-feature width C*F: B0 600,
# B1 864, B2/B3 1152, B4-B6 2304 (the 2304-dim features DELULU clusters).
_K33 = [(3, 3)]
PRESETS: dict[str, dict[str, Any]] = {
    "b0": dict(
        F=60,
        C=10,
        block_1d_type="conv+att",
        block_2d_type="basic_resnet",
        stages_setup=[
            (1, 2, 1, _K33, 30),
            (2, 3, 2, _K33, 30),
            (1, 3, 3, _K33, 30),
            (2, 4, 2, _K33, 10),
            (1, 3, 1, _K33, 10),
        ],
        group_divisor=1,
        global_context_att=True,
    ),
    "b1": dict(
        F=72,
        C=12,
        block_1d_type="conv+att",
        block_2d_type="convnext_like",
        stages_setup=[
            (1, 2, 1, _K33, None),
            (2, 3, 1, _K33, None),
            (3, 4, 1, _K33, 12),
            (2, 5, 1, _K33, 12),
            (2, 3, 1, _K33, 8),
        ],
        group_divisor=12,
        global_context_att=True,
    ),
    "b2": dict(
        F=72,
        C=16,
        block_1d_type="att",
        block_2d_type="convnext_like",
        stages_setup=[
            (1, 2, 1, _K33, 12),
            (2, 2, 1, _K33, 12),
            (1, 3, 1, _K33, 12),
            (2, 4, 1, _K33, 8),
            (1, 4, 1, _K33, 6),
            (2, 4, 1, _K33, 4),
        ],
        group_divisor=4,
        global_context_att=True,
    ),
    "b3": dict(
        F=72,
        C=16,
        block_1d_type="conv+att",
        block_2d_type="basic_resnet_fwse",
        stages_setup=[
            (1, 6, 4, _K33, 32),
            (2, 6, 2, _K33, 32),
            (1, 8, 2, _K33, 32),
            (2, 10, 2, _K33, 16),
            (1, 10, 1, _K33, 16),
            (2, 8, 1, _K33, 16),
        ],
        group_divisor=1,
        global_context_att=False,
    ),
    "b4": dict(
        F=72,
        C=32,
        block_1d_type="conv+att",
        block_2d_type="basic_resnet_fwse",
        stages_setup=[
            (1, 4, 2, _K33, 48),
            (2, 4, 2, _K33, 48),
            (1, 6, 2, _K33, 48),
            (2, 6, 1, _K33, 32),
            (1, 8, 1, _K33, 24),
            (2, 4, 1, _K33, 16),
        ],
        group_divisor=1,
        global_context_att=True,
    ),
    "b5": dict(
        F=72,
        C=32,
        block_1d_type="conv+att",
        block_2d_type="basic_resnet",
        stages_setup=[
            (1, 4, 2, _K33, 48),
            (2, 4, 2, _K33, 48),
            (1, 6, 2, _K33, 48),
            (3, 6, 1, _K33, 32),
            (1, 8, 1, _K33, 24),
            (2, 4, 1, _K33, 16),
        ],
        group_divisor=16,
        global_context_att=True,
    ),
    "b6": dict(
        F=72,
        C=32,
        block_1d_type="conv+att",
        block_2d_type="basic_resnet",
        stages_setup=[
            (1, 4, 4, _K33, 32),
            (2, 6, 2, _K33, 32),
            (1, 6, 2, _K33, 24),
            (3, 8, 1, _K33, 24),
            (1, 8, 1, _K33, 16),
            (2, 8, 1, _K33, 16),
        ],
        group_divisor=32,
        global_context_att=True,
    ),
}

# Published parameter counts (millions), used by the tests.
PUBLISHED_PARAMS_M = {"b0": 1.0, "b1": 2.2, "b2": 4.7, "b3": 3.0, "b4": 6.3, "b5": 9.2, "b6": 15.0}

# MelBanks keyword arguments of the official frontend that we implement.
_SPEC_KEYS = {
    "sample_rate",
    "n_fft",
    "win_length",
    "f_min",
    "f_max",
    "do_spec_aug",
    "norm_signal",
    "do_preemph",
    "spec_norm",
    "freq_start_bin",
    "num_apply_spec_aug",
    "freq_mask_width",
    "time_mask_width",
}
# Official constructor arguments that only change what the official forward returns or select code
# paths we do not implement; accepted when they hold these values.
_INERT_OFFICIAL_KEYS = {
    "return_all_outputs": None,  # any value: only changes the official forward's return type
    "tf_optimized_arch": False,
    "return_2d_output": False,
    "spec_dims": 1,
    "use_feats": True,
}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model its config describes; the message names the keys."""


@dataclass
class ReDimNetConfig:
    """Every constructor argument of the official ``ReDimNetWrap`` that shapes the weights or outputs.

    Defaults equal the official defaults, so a checkpoint's partial ``model_config`` means the same
    thing here. ``name`` is ours (the teacher's name in logs and label provenance).
    """

    F: int = 72
    C: int = 16
    block_1d_type: str = "att"
    block_2d_type: str = "convnext_like"
    stages_setup: list = field(default_factory=lambda: copy.deepcopy(_OFFICIAL_DEFAULT_STAGES))
    group_divisor: Union[int, None] = 4
    out_channels: Union[int, None] = None
    embed_dim: int = 192
    num_classes: Union[int, None] = None
    class_dropout: float = 0.0
    feat_agg_dropout: float = 0.0
    head_activation: Union[str, None] = None
    hop_length: int = 160
    pooling_func: str = "ASTP"
    feat_type: str = "pt"
    global_context_att: bool = False
    emb_bn: bool = False
    spec_params: dict = field(
        default_factory=lambda: {"do_spec_aug": False, "freq_mask_width": (0, 6), "time_mask_width": (0, 8)}
    )
    name: str = "redimnet"

    def __post_init__(self) -> None:
        # JSON turns tuples into lists; normalise so configs compare equal and the official code (which
        # unpacks stages as tuples) can read what we write.
        stages = []
        for i, stage in enumerate(self.stages_setup):
            if len(stage) != 5:
                raise ValueError(
                    f"stages_setup[{i}] = {stage!r}: expected (stride, num_blocks, conv_exp, kernel_sizes, att_block_red)"
                )
            stride, num_blocks, conv_exp, kernel_sizes, att_red = stage
            stages.append(
                (
                    int(stride),
                    int(num_blocks),
                    conv_exp,
                    [tuple(k) if isinstance(k, (list, tuple)) else k for k in kernel_sizes],
                    att_red,
                )
            )
        self.stages_setup = stages
        self.spec_params = {
            k: tuple(v) if isinstance(v, list) else v for k, v in dict(self.spec_params or {}).items()
        }
        unknown = set(self.spec_params) - _SPEC_KEYS
        if unknown:
            raise ValueError(
                f"Unsupported spec_params keys {sorted(unknown)}; supported: {sorted(_SPEC_KEYS)}"
            )
        if self.feat_type not in ("pt", "pt_mel"):
            raise NotImplementedError(
                f"feat_type={self.feat_type!r} is not implemented (only the PyTorch mel frontend 'pt')."
            )
        f = self.F
        for i, (stride, *_rest) in enumerate(self.stages_setup):
            if stride not in (1, 2, 3) or f % stride:
                raise ValueError(
                    f"stages_setup[{i}]: stride {stride} must be 1, 2 or 3 and divide {f} frequency bins"
                )
            f //= stride

    @property
    def feature_dim(self) -> int:
        """Width of the frame features: the backbone's output channels."""
        return self.out_channels if self.out_channels is not None else self.C * self.F

    def official_kwargs(self) -> dict[str, Any]:
        """The ``model_config`` dict of an official checkpoint: kwargs of the official ``ReDimNetWrap``."""
        kwargs = asdict(self)
        kwargs.pop("name")
        kwargs["stages_setup"] = [tuple(s) for s in self.stages_setup]
        kwargs["spec_params"] = dict(self.spec_params)
        return kwargs

    @classmethod
    def from_official_kwargs(cls, model_config: dict[str, Any], name: str = "redimnet") -> ReDimNetConfig:
        """Read an official ``model_config``; unknown or unsupported keys raise an error naming them."""
        known = {f for f in cls.__dataclass_fields__ if f != "name"}
        kwargs, problems = {}, []
        for key, value in model_config.items():
            if key in known:
                kwargs[key] = value
            elif key in _INERT_OFFICIAL_KEYS:
                expected = _INERT_OFFICIAL_KEYS[key]
                if expected is not None and value != expected:
                    problems.append(f"{key}={value!r} (only {expected!r} is supported)")
            else:
                problems.append(f"{key}={value!r} (unknown)")
        if problems:
            raise ValueError("Unsupported ReDimNet model_config entries: " + ", ".join(problems))
        return cls(**kwargs, name=name)

    def to_json_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


# --------------------------------------------------------------------------------------------------
# Masking helpers. ``mask`` is a float (B, T) tensor of 1 (valid frame) / 0 (padding), or None when no
# frame is padded. Zeroing padded frames before every conv with a temporal kernel reproduces the zero
# padding the unpadded run sees at its end.
# --------------------------------------------------------------------------------------------------


def _mask_time(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded frames of ``x`` (time is the last dim)."""
    if mask is None:
        return x
    shape = (mask.shape[0],) + (1,) * (x.dim() - 2) + (mask.shape[1],)
    return x * mask.view(shape)


def _masked_mean(
    x: torch.Tensor, mask: torch.Tensor | None, dim: int = -1, keepdim: bool = False
) -> torch.Tensor:
    """Mean over time (the last dim) of valid frames only."""
    if mask is None:
        return x.mean(dim=dim, keepdim=keepdim)
    m = mask.view((mask.shape[0],) + (1,) * (x.dim() - 2) + (mask.shape[1],))
    return (x * m).sum(dim=dim, keepdim=keepdim) / m.sum(dim=dim, keepdim=keepdim)


def _masked_mean_std(
    x: torch.Tensor, mask: torch.Tensor | None, unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance over time (last dim) of valid frames, ``keepdim=True``; returns (mean, var)."""
    if mask is None:
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=1 if unbiased else 0)
        return mean, var
    m = mask.view((mask.shape[0],) + (1,) * (x.dim() - 2) + (mask.shape[1],))
    n = m.sum(dim=-1, keepdim=True)
    mean = (x * m).sum(dim=-1, keepdim=True) / n
    var = (((x - mean) * m) ** 2).sum(dim=-1, keepdim=True) / (n - 1 if unbiased else n).clamp(min=1)
    return mean, var


# --------------------------------------------------------------------------------------------------
# Frontend
# --------------------------------------------------------------------------------------------------


class PreEmphasis(nn.Module):
    """y[t] = x[t] - coef * x[t-1], with x[-1] := x[1] (reflection), as the official frontend does."""

    def __init__(self, coef: float = 0.97) -> None:
        super().__init__()
        # A buffer (not a float) because official checkpoints store it: ``spec.torchfbank.1.flipped_filter``.
        self.register_buffer("flipped_filter", torch.tensor([[[-coef, 1.0]]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(F.pad(x.unsqueeze(1), (1, 0), mode="reflect"), self.flipped_filter).squeeze(1)


class NormalizeAudio(nn.Module):
    """Per-item zero-mean, unit-variance waveform over its valid samples (``norm_signal`` option)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, sample_mask: torch.Tensor | None = None) -> torch.Tensor:
        mean, var = _masked_mean_std(x, sample_mask, unbiased=False)
        return (x - mean) / (var.sqrt() + self.eps)


class MelFrontend(nn.Module):
    """Waveform -> log-mel (B, F, T) with T = 1 + N // hop, mean-subtracted per bin over valid frames.

    ``torchfbank`` holds the same modules, at the same indices, as the official frontend so that its
    buffers (pre-emphasis filter, STFT window, mel filterbank) keep their checkpoint names. We call them
    one by one because the STFT's centre padding must be a reflection of each item's own end.
    """

    def __init__(self, n_mels: int, hop_length: int, spec_params: dict[str, Any]) -> None:
        super().__init__()
        p = dict(spec_params)
        self.sample_rate = int(p.get("sample_rate", 16000))
        self.n_fft = int(p.get("n_fft", 512))
        self.hop_length = hop_length
        self.norm_signal = bool(p.get("norm_signal", False))
        self.do_preemph = bool(p.get("do_preemph", True))
        self.spec_norm_type = p.get("spec_norm", "mn")
        self.do_spec_aug = bool(p.get("do_spec_aug", False))
        self.freq_mask_width = tuple(p.get("freq_mask_width", (0, 8)))
        self.time_mask_width = tuple(p.get("time_mask_width", (0, 10)))
        self.freq_start_bin = int(p.get("freq_start_bin", 0))
        self.num_apply_spec_aug = int(p.get("num_apply_spec_aug", 1))
        mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            win_length=int(p.get("win_length", 400)),
            hop_length=hop_length,
            f_min=float(p.get("f_min", 20)),
            f_max=float(p.get("f_max", 7600)),
            n_mels=n_mels,
            window_fn=torch.hamming_window,
            center=False,  # we centre-pad per item below
        )
        # torch.hamming_window(periodic=True) returns a view of a longer window; own the storage so the
        # buffer can be saved with safetensors (which refuses partial views).
        mel.spectrogram.window = mel.spectrogram.window.clone()
        self.torchfbank = nn.Sequential(
            NormalizeAudio() if self.norm_signal else nn.Identity(),
            PreEmphasis() if self.do_preemph else nn.Identity(),
            mel,
        )
        if self.spec_norm_type == "bn":
            self.spec_norm = nn.BatchNorm1d(n_mels)
        elif self.spec_norm_type not in ("mn", "mvn", None, "none"):
            raise ValueError(f"spec_norm={self.spec_norm_type!r} is not supported (mn, mvn, bn or None)")

    def _centre_pad(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        pad = self.n_fft // 2
        if lengths is None:
            return F.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        out = x.new_zeros(x.shape[0], x.shape[1] + 2 * pad)
        for i, n in enumerate(lengths.tolist()):
            out[i, : n + 2 * pad] = F.pad(x[i : i + 1, :n].unsqueeze(1), (pad, pad), mode="reflect")[0, 0]
        return out

    def _spec_augment(self, x: torch.Tensor) -> torch.Tensor:
        """One random frequency band and one random time span zeroed per item (SpecAugment)."""
        batch, n_freq, n_time = x.shape
        for _ in range(self.num_apply_spec_aug):
            for dim, size, (lo, hi), start in (
                (2, n_time, self.time_mask_width, 0),
                (1, n_freq, self.freq_mask_width, self.freq_start_bin),
            ):
                width = torch.randint(lo, max(hi, lo + 1), (batch, 1), device=x.device)
                pos = torch.randint(
                    start, max(start + 1, size - int(width.max())), (batch, 1), device=x.device
                )
                idx = torch.arange(size, device=x.device).view(1, -1)
                band = (idx >= pos) & (idx < pos + width)
                x = x.masked_fill(band.unsqueeze(1) if dim == 2 else band.unsqueeze(2), 0.0)
        return x

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None, frame_mask: torch.Tensor | None
    ) -> torch.Tensor:
        # Always float32, as the official front end forces (pre-emphasis 0.97 is 0.96875 in bf16, and the
        # log-mel of a bf16 STFT is off by up to ~0.8): autocast is switched off here, whatever the caller.
        with torch.no_grad(), torch.autocast(device_type=waveforms.device.type, enabled=False):
            x = waveforms.float()
            if self.norm_signal:
                sample_mask = None
                if lengths is not None:
                    sample_mask = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]).float()
                x = self.torchfbank[0](x, sample_mask)
            x = self.torchfbank[1](x)
            x = self.torchfbank[2](self._centre_pad(x, lengths))
            x = (x + 1e-6).log()
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            if self.spec_norm_type == "mn":
                x = x - _masked_mean(x, frame_mask, keepdim=True)
            elif self.spec_norm_type == "mvn":
                mean, var = _masked_mean_std(x, frame_mask, unbiased=True)
                x = (x - mean) / (var.sqrt() + 1e-8)
            elif self.spec_norm_type == "bn":
                x = self.spec_norm(x)
            if self.training and self.do_spec_aug:
                x = self._spec_augment(x)
        return x


# --------------------------------------------------------------------------------------------------
# Shared layers
# --------------------------------------------------------------------------------------------------


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of (B, C, ...) tensors, without transposing to channels-last."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two passes instead of torch.var_mean: var_mean over dim 1 is ~8x slower on CPU for NCHW input.
        centred = x - x.mean(dim=1, keepdim=True)
        var = (centred * centred).mean(dim=1, keepdim=True)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return centred * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def _fold_bn(
    conv: nn.Module, bn: nn.Module, channels: slice = slice(None)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``conv`` with the eval-mode BatchNorm that follows it folded in (channels ``channels``
    of ``bn``): one pass over the activations instead of two, exact up to rounding."""
    scale = bn.weight[channels] * torch.rsqrt(bn.running_var[channels] + bn.eps)
    weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    return weight, (bias - bn.running_mean[channels]) * scale + bn.bias[channels]


def _conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv`` with the given weights. On one thread, PyTorch runs a 1x1 conv of a small batch through
    its slow im2col path instead of oneDNN; on a channels-last tensor we run it as one GEMM over the
    contiguous channel dim instead."""
    if (
        weight.shape[2:] == (1, 1)
        and conv.groups == 1
        and torch.get_num_threads() == 1
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return F.linear(x.permute(0, 2, 3, 1), weight[:, :, 0, 0], bias).permute(0, 3, 1, 2)
    return conv._conv_forward(x, weight, bias)


def _conv_bn(conv: nn.Module, bn: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))`` (or ``conv(x)`` without ``bn``); in eval mode one convolution with the
    BatchNorm folded in."""
    if bn is None:
        return _conv(conv, x, conv.weight, conv.bias)
    if bn.training:
        return bn(_conv(conv, x, conv.weight, conv.bias))
    return _conv(conv, x, *_fold_bn(conv, bn))


class ConvNeXtBlock(nn.Module):
    """Residual block: parallel depthwise(-ish) convs -> BN -> activation -> pointwise conv.

    Used as the 2D ``convnext_like`` block (one 3x3 kernel) and inside the 1D time-context blocks (long
    1D kernels over time).
    """

    def __init__(
        self,
        channels: int,
        dim: int,
        kernel_sizes: list,
        group_divisor: Union[int, None] = 1,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv1d
        norm = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        groups = channels // group_divisor if group_divisor is not None else 1
        self.dwconvs = nn.ModuleList(
            [conv(channels, channels, kernel_size=k, padding="same", groups=groups) for k in kernel_sizes]
        )
        self.norm = norm(channels * len(kernel_sizes))
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.pwconv1 = conv(channels * len(kernel_sizes), channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        xm = _mask_time(x, mask)
        if len(self.dwconvs) == 1:
            h = _conv_bn(self.dwconvs[0], self.norm, xm)
        elif self.norm.training:
            h = self.norm(torch.cat([conv(xm) for conv in self.dwconvs], dim=1))
        else:  # each kernel's conv absorbs its slice of the shared BatchNorm
            width = x.shape[1]
            h = torch.cat(
                [
                    _conv(conv, xm, *_fold_bn(conv, self.norm, slice(i * width, (i + 1) * width)))
                    for i, conv in enumerate(self.dwconvs)
                ],
                dim=1,
            )
        out = _conv_bn(self.pwconv1, None, self.act(h))
        return out.add_(x)


class FrequencySE(nn.Module):
    """Frequency-wise squeeze-and-excitation: one gate per frequency bin, from the channel/time mean."""

    def __init__(self, num_freq: int, num_feats: int = 64) -> None:
        super().__init__()
        self.squeeze = nn.Linear(num_freq, num_feats)
        self.exitation = nn.Linear(num_feats, num_freq)  # (sic) official parameter name

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = _masked_mean(x.mean(dim=1), mask)  # (B, F)
        gate = torch.sigmoid(self.exitation(F.relu(self.squeeze(s))))
        return x * gate[:, None, :, None]


class ResBasicBlock(nn.Module):
    """ResNet basic block with grouped 3x3 + pointwise convs; ``use_fwse`` adds frequency-wise SE."""

    def __init__(
        self, channels: int, num_freq: int, group_divisor: Union[int, None], use_fwse: bool, se_channels: int
    ) -> None:
        super().__init__()
        grouped = group_divisor is not None
        groups = channels // group_divisor if grouped else 1
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=groups)
        self.conv1pw = nn.Conv2d(channels, channels, 1) if grouped else nn.Identity()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=groups)
        self.conv2pw = nn.Conv2d(channels, channels, 1) if grouped else nn.Identity()
        self.bn2 = nn.BatchNorm2d(channels)
        self.se = FrequencySE(num_freq, se_channels) if use_fwse else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # The official block applies ReLU before bn1; kept for weight compatibility.
        out = self.conv1(_mask_time(x, mask))
        if isinstance(self.conv1pw, nn.Conv2d):
            out = _conv_bn(self.conv1pw, None, out)
        out = self.bn1(F.relu(out, inplace=True))
        out = self.conv2(_mask_time(out, mask))
        if isinstance(self.conv2pw, nn.Conv2d):
            out = _conv_bn(self.conv2pw, self.bn2, out)
        else:
            out = self.bn2(out)
        if self.se is not None:
            out = self.se(out, mask)
        return F.relu(out.add_(x), inplace=True)


class ConvBlock2d(nn.Module):
    """One 2D block of a stage; ``block_type`` picks ConvNeXt-like, ResNet or ResNet + fwSE."""

    def __init__(
        self, channels: int, num_freq: int, block_type: str, group_divisor: Union[int, None]
    ) -> None:
        super().__init__()
        if block_type in ("convnext_like", "convnext_like_relu"):
            activation = "relu" if block_type.endswith("relu") else "gelu"
            self.conv_block = ConvNeXtBlock(channels, 2, [(3, 3)], group_divisor, activation)
        elif block_type in ("basic_resnet", "basic_resnet_fwse"):
            se_channels = min(64, max(channels, 32))
            use_fwse = block_type == "basic_resnet_fwse"
            self.conv_block = ResBasicBlock(channels, num_freq, group_divisor, use_fwse, se_channels)
        else:
            raise ValueError(
                f"Unknown block_2d_type {block_type!r}: expected convnext_like, convnext_like_relu, "
                "basic_resnet or basic_resnet_fwse"
            )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv_block(x, mask)


# --------------------------------------------------------------------------------------------------
# 1D time-context blocks
# --------------------------------------------------------------------------------------------------


ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager")


class SelfAttention(nn.Module):
    """Multi-head self-attention over time; padded frames are never attended to.

    ``implementation``: ``"sdpa"`` (``F.scaled_dot_product_attention``: fused kernels that never
    materialise the T x T score matrix on GPU), ``"eager"`` (plain matmuls, which beat SDPA on CPU
    for these tiny 5-36-dim heads) or ``"auto"`` (SDPA on accelerators, eager on CPU). Both give the
    same outputs (tested); set it for a whole model with ``ReDimNet.set_attention_implementation``.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"attention width {embed_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.implementation = "auto"
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, time, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, time, self.num_heads, width // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        keep = None if mask is None else mask.bool()[:, None, None, :]  # (batch, 1, 1, time): True = attend
        sdpa = self.implementation == "sdpa" or (self.implementation == "auto" and x.device.type != "cpu")
        if sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * (width // self.num_heads) ** -0.5
            if keep is not None:
                scores = scores.masked_fill(~keep, float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, time, width))


class FeedForward(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(hidden, intermediate)
        self.output_dense = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x), approximate="tanh"))


class TransformerLayer(nn.Module):
    """Post-LayerNorm transformer layer on channels-first (B, C, T) input."""

    def __init__(self, width: int, mlp_width: int, num_heads: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        self.attention = SelfAttention(width, num_heads)
        self.layer_norm = nn.LayerNorm(width, eps=eps)
        self.feed_forward = FeedForward(width, mlp_width)
        self.final_layer_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x.transpose(1, 2)
        h = self.layer_norm(h + self.attention(h, mask))
        h = self.final_layer_norm(h + self.feed_forward(h))
        return h.transpose(1, 2)


class PosEncConv(nn.Module):
    """Convolutional positional encoding: x + LN(depthwise_conv(x))."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = ChannelsFirstLayerNorm(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.norm(self.conv(_mask_time(x, mask)))


class TimeContextBlock1d(nn.Module):
    """Residual 1D block on the (B, C*F, T) view: 1x1 down-projection -> temporal context -> 1x1 up.

    ``block_type``: ``att`` (conv positional encoding + transformer layer), ``conv+att`` (four ConvNeXt
    1D blocks with kernels 7/19/31/59 + transformer layer), ``conv`` (four multi-kernel ConvNeXt 1D
    blocks) or ``fc`` (frame-wise MLP, no time context).
    """

    def __init__(self, channels: int, hidden: int, block_type: str, pos_kernel_size: int = 59) -> None:
        super().__init__()
        self.red_dim_conv = nn.Sequential(nn.Conv1d(channels, hidden, 1), ChannelsFirstLayerNorm(hidden))
        if block_type == "att":
            self.tcm = nn.Sequential(
                PosEncConv(hidden, pos_kernel_size), TransformerLayer(hidden, 2 * hidden)
            )
        elif block_type == "conv+att":
            self.tcm = nn.Sequential(
                *[ConvNeXtBlock(hidden, 1, [k]) for k in (7, 19, 31, 59)], TransformerLayer(hidden, hidden)
            )
        elif block_type == "conv":
            self.tcm = nn.Sequential(*[ConvNeXtBlock(hidden, 1, [7, 15, 31]) for _ in range(4)])
        elif block_type == "fc":
            self.tcm = nn.Sequential(
                nn.Conv1d(hidden, 2 * hidden, 1),
                ChannelsFirstLayerNorm(2 * hidden),
                nn.GELU(),
                nn.Conv1d(2 * hidden, hidden, 1),
            )
        else:
            raise ValueError(f"Unknown block_1d_type {block_type!r}: expected att, conv+att, conv or fc")
        self.block_type = block_type
        self.exp_dim_conv = nn.Conv1d(hidden, channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.red_dim_conv(x)
        if self.block_type == "fc":
            h = self.tcm(h)
        else:
            for layer in self.tcm:
                h = layer(h, mask)
        return x + self.exp_dim_conv(h)


# --------------------------------------------------------------------------------------------------
# Stages and backbone
# --------------------------------------------------------------------------------------------------


class StageWeighting(nn.Module):
    """Per-channel softmax-weighted sum of all earlier 1D outputs (the ReDimNet "feature bus")."""

    def __init__(self, num_inputs: int, channels: int, trainable: bool = True) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, num_inputs, channels, 1), requires_grad=trainable)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if len(inputs) == 1:
            return inputs[0]  # softmax over one input is exactly 1
        w = torch.softmax(self.w, dim=1)
        out = inputs[0] * w[:, 0]
        for i in range(1, len(inputs)):
            out = (
                out.addcmul_(inputs[i], w[:, i]) if not torch.is_grad_enabled() else out + inputs[i] * w[:, i]
            )
        return out


class _Reshape(nn.Module):
    """Parameter-free placeholder keeping the official module numbering inside a stage."""


class ReDimNetStage(nn.Sequential):
    """weigh earlier 1D outputs -> 2D (c, f) view -> strided conv over frequency (f / s, c * s) ->
    2D blocks -> optional channel squeeze -> 1D view -> optional 1D time-context block.

    It is an ``nn.Sequential`` only so its children carry the official indices (``stage3.2.weight``);
    ``forward`` runs them with the padding mask.
    """

    def __init__(
        self,
        stage_index: int,
        c: int,
        f: int,
        stage: Stage,
        config: ReDimNetConfig,
    ) -> None:
        stride, num_blocks, conv_exp, _kernel_sizes, att_red = stage
        width = config.C * config.F
        num_inputs = stage_index + 1
        c_out = stride * c
        f_out = f // stride
        expanded = int(c_out * conv_exp)
        layers: list[nn.Module] = [
            StageWeighting(num_inputs, width if num_inputs > 1 else 1, trainable=num_inputs > 1),
            _Reshape(),
            nn.Conv2d(c, int(stride * c * conv_exp), kernel_size=(stride, 1), stride=(stride, 1)),
        ]
        layers += [
            ConvBlock2d(expanded, f_out, config.block_2d_type, config.group_divisor)
            for _ in range(num_blocks)
        ]
        if conv_exp != 1:
            relu = "relu" in config.block_1d_type and "relu" in config.block_2d_type
            gd = config.group_divisor
            layers.append(
                nn.Sequential(
                    nn.Conv2d(
                        expanded, c_out, 3, padding="same", groups=c_out // gd if gd is not None else 1
                    ),
                    nn.BatchNorm2d(c_out, eps=1e-6),
                    nn.ReLU() if relu else nn.GELU(),
                    nn.Conv2d(c_out, c_out, 1),
                )
            )
        layers.append(_Reshape())
        if att_red is not None:
            layers.append(TimeContextBlock1d(width, width // att_red, config.block_1d_type))
        super().__init__(*layers)
        self.c_in, self.f_in, self.c_out, self.f_out = c, f, c_out, f_out
        self.num_blocks = num_blocks
        self.has_squeeze = conv_exp != 1
        self.has_1d = att_red is not None

    def forward(self, inputs: list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        x = self[0](inputs)
        batch, _, time = x.shape
        # 1D channel index = f * c + c_index (frequency-major), the official reshape convention. The 2D
        # part runs channels-last: oneDNN's grouped and 1x1 convs are 3-5x faster on CPU in that layout.
        x = (
            x.view(batch, self.f_in, self.c_in, time)
            .transpose(1, 2)
            .contiguous(memory_format=torch.channels_last)
        )
        x = self[2](x)
        for i in range(3, 3 + self.num_blocks):
            x = self[i](x, mask)
        j = 3 + self.num_blocks
        if self.has_squeeze:
            conv, norm, act, pointwise = self[j]
            x = _conv_bn(pointwise, None, act(_conv_bn(conv, norm, _mask_time(x, mask))))
            j += 1
        x = x.transpose(1, 2).reshape(batch, self.f_out * self.c_out, time)
        if self.has_1d:
            x = self[j + 1](x, mask)
        return x


class ReDimNetBackbone(nn.Module):
    """Log-mel (B, 1, F, T) -> frame features (B, C*F, T) (or ``out_channels`` with the MFA conv)."""

    def __init__(self, config: ReDimNetConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, config.C, 3, padding="same"), ChannelsFirstLayerNorm(config.C))
        c, f = config.C, config.F
        self.num_stages = len(config.stages_setup)
        for i, stage in enumerate(config.stages_setup):
            module = ReDimNetStage(i, c, f, stage, config)
            setattr(self, f"stage{i}", module)
            c, f = module.c_out, module.f_out
        width = config.C * config.F
        self.fin_wght1d = StageWeighting(self.num_stages + 1, width, trainable=self.num_stages > 1)
        if config.out_channels is not None:
            self.mfa = nn.Sequential(
                nn.Conv1d(width, config.out_channels, 1), nn.BatchNorm1d(config.out_channels)
            )
        else:
            self.mfa = nn.Identity()
        self.feat_agg_dropout = config.feat_agg_dropout

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stem(_mask_time(mel, mask).contiguous(memory_format=torch.channels_last))
        batch, c, f, time = x.shape
        outputs = [x.transpose(1, 2).reshape(batch, f * c, time)]
        for i in range(self.num_stages):
            out = getattr(self, f"stage{i}")(outputs, mask)
            outputs.append(
                F.dropout(out, self.feat_agg_dropout, self.training) if self.feat_agg_dropout else out
            )
        x = self.fin_wght1d(outputs)
        return _conv_bn(self.mfa[0], self.mfa[1], x) if isinstance(self.mfa, nn.Sequential) else x


# --------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------


class AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling (ECAPA-TDNN), optionally with global context (the utterance mean and
    std appended to each frame's attention input). Attention and statistics use valid frames only."""

    def __init__(self, in_dim: int, bottleneck_dim: int = 128, global_context_att: bool = False) -> None:
        super().__init__()
        self.global_context_att = global_context_att
        self.linear1 = nn.Conv1d(in_dim * 3 if global_context_att else in_dim, bottleneck_dim, 1)
        self.linear2 = nn.Conv1d(bottleneck_dim, in_dim, 1)
        self.in_dim = in_dim

    def get_out_dim(self) -> int:
        return 2 * self.in_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.global_context_att:
            mean, var = _masked_mean_std(x, mask, unbiased=True)
            std = torch.sqrt(var + 1e-7)
            w = self.linear1.weight[:, :, 0]
            d = self.in_dim
            # linear1([x; mean; std]) = W_x x + (W_m mean + W_s std + b): the context is a per-item bias.
            bias = w[:, d : 2 * d] @ mean + w[:, 2 * d :] @ std + self.linear1.bias[:, None]
            h = torch.tanh(torch.matmul(w[:, :d], x) + bias)
        else:
            h = torch.tanh(self.linear1(x))
        logits = self.linear2(h)
        if mask is not None:
            logits = logits.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        alpha = torch.softmax(logits, dim=2)
        mean = torch.sum(alpha * x, dim=2)
        var = torch.sum(alpha * x * x, dim=2) - mean * mean
        return torch.cat([mean, torch.sqrt(var.clamp(min=1e-7))], dim=1)


class StatsPool(nn.Module):
    """Temporal mean (``TAP``) or mean + std (``TSTP``) over valid frames."""

    def __init__(self, in_dim: int, with_std: bool) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.with_std = with_std

    def get_out_dim(self) -> int:
        return self.in_dim * (2 if self.with_std else 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mean, var = _masked_mean_std(x, mask, unbiased=True)
        if not self.with_std:
            return mean.squeeze(-1)
        return torch.cat([mean.squeeze(-1), torch.sqrt(var.squeeze(-1) + 1e-7)], dim=1)


def _build_pool(name: str, in_dim: int, global_context_att: bool) -> nn.Module:
    if name == "ASTP":
        return AttentiveStatsPool(in_dim, global_context_att=global_context_att)
    if name in ("TSTP", "TAP"):
        return StatsPool(in_dim, with_std=name == "TSTP")
    raise NotImplementedError(f"pooling_func={name!r} is not implemented (ASTP, TSTP, TAP)")


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class ReDimNet(SpeakerTeacher):
    """ReDimNet speaker model: waveform -> frame features (teacher) or 192-d embedding.

    Build with ``from_preset("b0")``, ``from_official_checkpoint("b6-vox2-ptn.pt")`` or
    ``from_pretrained(folder)``. Submodule names mirror the official ``ReDimNetWrap``.
    """

    def __init__(self, config: ReDimNetConfig) -> None:
        super().__init__()
        self.config = config
        self.name = config.name
        self.hop_length = config.hop_length
        self.feature_dim = config.feature_dim
        self.spec = MelFrontend(config.F, config.hop_length, config.spec_params)
        self.sample_rate = self.spec.sample_rate
        self.backbone = ReDimNetBackbone(config)
        self.pool = _build_pool(config.pooling_func, config.feature_dim, config.global_context_att)
        pool_dim = self.pool.get_out_dim()
        self.bn = nn.BatchNorm1d(pool_dim)
        self.linear = nn.Linear(pool_dim, config.embed_dim)
        self.bn2 = nn.BatchNorm1d(config.embed_dim) if config.emb_bn else None
        if config.num_classes is not None:
            # Kept only so checkpoints with a classifier load strictly; ``forward`` returns embeddings.
            self.cls_head = nn.Sequential(
                nn.ReLU(), nn.Dropout(config.class_dropout), nn.Linear(config.embed_dim, config.num_classes)
            )

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> ReDimNet:
        """A randomly initialised model of size ``b0``...``b6``; ``overrides`` replace config fields
        (including ``name``, the teacher's name; default ``redimnet-<preset>``)."""
        key = preset.lower()
        if key not in PRESETS:
            raise ValueError(f"Unknown ReDimNet preset {preset!r}; choose from {sorted(PRESETS)}")
        kwargs = {**copy.deepcopy(PRESETS[key]), **overrides}
        kwargs.setdefault("name", f"redimnet-{key}")
        return cls(ReDimNetConfig(**kwargs))

    @classmethod
    def from_official_checkpoint(
        cls, path_or_dict: Union[str, os.PathLike, dict], name: str | None = None
    ) -> ReDimNet:
        """Load an official ``{"model_config": ..., "state_dict": ...}`` checkpoint strictly.

        Files are read with ``torch.load(weights_only=True)`` (no arbitrary code runs). Any missing,
        unexpected or wrongly shaped tensor raises ``CheckpointMismatchError`` naming the keys.
        """
        source = "<dict>"
        if isinstance(path_or_dict, dict):
            ckpt = path_or_dict
        else:
            source = os.fspath(path_or_dict)
            try:
                ckpt = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as err:  # corrupted file, pickled code, truncated download...
                raise ValueError(
                    f"Cannot read ReDimNet checkpoint {source!r} with weights_only=True: {err}"
                ) from err
        if not isinstance(ckpt, dict) or "model_config" not in ckpt or "state_dict" not in ckpt:
            found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"{source}: expected a dict with 'model_config' and 'state_dict', found {found}")
        if name is None:
            name = os.path.splitext(os.path.basename(source))[0] if source != "<dict>" else "redimnet"
        model = cls(ReDimNetConfig.from_official_kwargs(ckpt["model_config"], name=name))
        model.load_state_dict_strict(ckpt["state_dict"], source=source)
        return model.eval()

    def load_state_dict_strict(
        self, state_dict: dict[str, torch.Tensor], source: str = "<state_dict>"
    ) -> None:
        """``load_state_dict(strict=True)`` with an error that lists missing/unexpected/mis-shaped keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = sorted(
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
            for k in set(own) & set(state_dict)
            if tuple(state_dict[k].shape) != tuple(own[k].shape)
        )
        if missing or unexpected or shapes:

            def show(keys: list[str]) -> str:
                return ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")

            parts = []
            if missing:
                parts.append(f"missing keys: {show(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {show(unexpected)}")
            if shapes:
                parts.append(f"shape mismatches: {show(shapes)}")
            raise CheckpointMismatchError(f"{source} does not match {self.name}: " + "; ".join(parts))
        self.load_state_dict(state_dict, strict=True)

    def set_attention_implementation(self, implementation: str) -> None:
        """``"auto"`` (default: SDPA on accelerators, plain matmuls on CPU), ``"sdpa"`` or ``"eager"``."""
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}"
            )
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.implementation = implementation

    def official_checkpoint(self) -> dict[str, Any]:
        """The official ``{"model_config", "state_dict"}`` layout (what ``torch.hub`` loaders expect)."""
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        return {"model_config": self.config.official_kwargs(), "state_dict": state}

    def save_official_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Write the official ``.pt`` layout atomically (loadable with ``weights_only=True``)."""
        ckpt = self.official_checkpoint()
        atomic_write(os.fspath(path), lambda tmp: torch.save(ckpt, tmp))

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> None:
        """Write ``config.json`` + ``model.safetensors`` (both atomically)."""
        from safetensors.torch import save_file

        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        config = {"model_type": "redimnet", **self.config.to_json_dict()}

        def write_config(tmp: str) -> None:
            with open(tmp, "w") as fh:
                json.dump(config, fh, indent=2)

        atomic_write(
            os.path.join(folder, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
        )
        atomic_write(os.path.join(folder, CONFIG_NAME), write_config)

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike]) -> ReDimNet:
        """Load a folder written by ``save_pretrained`` (strictly)."""
        from safetensors.torch import load_file

        folder = os.fspath(folder)
        config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{folder!r} is not a saved ReDimNet: {os.path.basename(path)} is missing"
                )
        with open(config_path) as fh:
            raw = json.load(fh)
        if raw.pop("model_type", "redimnet") != "redimnet":
            raise ValueError(f"{config_path}: model_type is not 'redimnet'")
        model = cls(ReDimNetConfig(**raw))
        model.load_state_dict_strict(load_file(weights_path), source=weights_path)
        return model.eval()

    # ---- forward ------------------------------------------------------------------------------

    def _frame_mask(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Validate ``lengths``; return (lengths or None when nothing is padded, float frame mask or None)."""
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}")
        num_samples = waveforms.shape[1]
        min_samples = self.spec.n_fft // 2 + 1  # the centred STFT reflects n_fft // 2 samples
        if lengths is None:
            if num_samples < min_samples:
                raise ValueError(
                    f"waveforms have {num_samples} samples; ReDimNet needs at least {min_samples}"
                )
            return None, None
        lengths = torch.as_tensor(lengths, device=waveforms.device).long()
        if lengths.shape != (waveforms.shape[0],):
            raise ValueError(f"lengths must have shape ({waveforms.shape[0]},), got {tuple(lengths.shape)}")
        bad = [(i, n) for i, n in enumerate(lengths.tolist()) if not min_samples <= n <= num_samples]
        if bad:
            i, n = bad[0]
            raise ValueError(
                f"item {i} has length {n}: lengths must lie in [{min_samples}, {num_samples}] ({len(bad)} bad items)"
            )
        if bool((lengths == num_samples).all()):
            return None, None
        frames = self.frame_lengths(lengths)
        num_frames = int(self.frame_lengths(num_samples))
        mask = (torch.arange(num_frames, device=waveforms.device)[None] < frames[:, None]).float()
        return lengths, mask

    def frame_features(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-pooling backbone output at ``hop_length`` (10 ms) frames.

        Args:
            waveforms: ``(batch_size, num_samples)`` 16 kHz audio, right-padded.
            lengths: ``(batch_size,)`` valid samples per item, or ``None`` (all valid).

        Returns:
            ``(batch_size, 1 + num_samples // hop_length, feature_dim)``; an item's first
            ``frame_lengths(lengths[i])`` frames equal those of its unpadded run. Runs with the caller's
            grad mode: wrap in ``torch.inference_mode()`` for extraction.
        """
        return self._backbone_forward(waveforms, lengths)[0].transpose(1, 2).contiguous()

    def _backbone_forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        lengths, mask = self._frame_mask(waveforms, lengths)
        mel = self.spec(waveforms, lengths, mask)
        return self.backbone(mel.unsqueeze(1), mask), mask

    def window_embeddings(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None, window_frames: int = 101
    ) -> torch.Tensor:
        """A speaker embedding at every 10 ms frame: the embedding head applied to the statistics of
        the ``window_frames`` backbone frames centred on it.

        Why: single backbone frames mostly describe the local spectrum (phone, pitch), so their
        k-means clusters track content about as much as MFCC clusters do (see
        ``results/small_scale``). The head, trained to map pooled statistics to speaker identity,
        projects a short window onto the speaker directions. The head's attentive pooling is
        replaced by a uniform mean + std inside the window (the attention weights are computed
        for whole utterances); windows are cut at each item's ends and never see padding, so a
        padded item gives the embeddings of its unpadded run. Needs eval mode (BatchNorm uses its
        running statistics); the head runs in float32 even under autocast.

        Returns:
            ``(batch_size, 1 + num_samples // hop_length, embed_dim)``, not length-normalised.
        """
        if window_frames < 1 or window_frames % 2 == 0:
            raise ValueError(f"window_frames must be a positive odd number, got {window_frames}")
        if self.training:
            raise RuntimeError("window_embeddings needs eval mode: call .eval() first")
        features, mask = self._backbone_forward(waveforms, lengths)
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.float()  # (B, C, T)
            valid = x.new_ones(x.shape[0], 1, x.shape[2]) if mask is None else mask[:, None, :].float()
            x = x * valid
            half = window_frames // 2

            def window_sum(values: torch.Tensor) -> torch.Tensor:
                # sum over [t - half, t + half]; zero padding at the ends = windows cut at the edges
                return F.avg_pool1d(values, window_frames, stride=1, padding=half) * window_frames

            count = window_sum(valid).clamp(min=1.0)
            mean = window_sum(x) / count
            var = (window_sum(x * x) / count - mean * mean).clamp(min=1e-7)
            stats = torch.cat([mean, torch.sqrt(var)], dim=1)  # (B, 2C, T), like the pooled vector
            if not getattr(self.pool, "with_std", True):  # "TAP" pooling: the mean only
                stats = mean
            out = self.linear(self.bn(stats).transpose(1, 2))  # (B, T, embed_dim)
            if self.bn2 is not None:
                out = self.bn2(out.transpose(1, 2)).transpose(1, 2)
        return out.contiguous()

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Speaker embeddings ``(batch_size, embed_dim)`` (192) of ``(batch_size, num_samples)`` audio.

        ``lengths`` works as in ``frame_features``. In training mode BatchNorm's batch statistics still
        see padded frames, so train on equal-length crops (as ``teacher_training`` does).
        """
        features, mask = self._backbone_forward(waveforms, lengths)
        out = self.linear(self.bn(self.pool(features, mask)))
        if self.bn2 is not None:
            out = self.bn2(out)
        return out


class ReDimNetWindowEmbeddings(SpeakerTeacher):
    """A ReDimNet teacher whose frame features are sliding-window speaker embeddings.

    The paper clusters ReDimNet's pre-pooling frame features (``ReDimNet.frame_features``, the
    default). This wrapper is the other reading of "frame-level speaker embeddings": the
    ``embed_dim``-wide output of the embedding head over a ``window_seconds`` window centred on
    each 10 ms frame (see ``ReDimNet.window_embeddings``). It keeps the teacher's frame grid, so
    the label pipeline aligns, clusters and caches it like any teacher; its ``name`` carries the
    window so centroids fitted on one kind of feature are never used with the other.
    """

    output = "window-embedding"  # as in labels.TEACHER_OUTPUTS

    def __init__(self, model: ReDimNet, window_seconds: float = 1.0) -> None:
        super().__init__()
        if not window_seconds > 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
        self.model = model.eval()
        self.config = model.config
        self.sample_rate = model.sample_rate
        self.hop_length = model.hop_length
        self.feature_dim = model.config.embed_dim
        # odd, so the window is centred on its frame
        self.window_frames = 2 * int(round(window_seconds * model.sample_rate / model.hop_length / 2)) + 1
        self.name = f"{model.name}:window-{self.window_frames}"
        self.window_seconds = float(window_seconds)
        self.output_settings = {
            "output": self.output,
            "window_seconds": self.window_seconds,
            "window_frames": self.window_frames,
        }

    def frame_features(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.window_embeddings(waveforms, lengths, self.window_frames)


def load_teacher(
    spec: Union[str, os.PathLike, SpeakerTeacher],
    device: Union[str, torch.device, None] = None,
    **overrides,
) -> SpeakerTeacher:
    """Build a teacher from ``spec`` and put it in eval mode.

    ``spec`` may be an existing ``SpeakerTeacher`` (returned as is), a folder written by
    ``ReDimNet.save_pretrained`` (``config.json`` + ``model.safetensors``), an official ReDimNet
    ``.pt`` checkpoint (read with ``weights_only=True``), or a preset name such as ``"b0"``
    (random weights: only useful for tests and smoke runs, since the features carry no speaker
    information). ``overrides`` are passed to ``ReDimNet.from_preset`` for preset names.
    """
    if isinstance(spec, SpeakerTeacher):
        teacher = spec
    else:
        text = os.fspath(spec)
        if os.path.isdir(text):
            teacher = ReDimNet.from_pretrained(text)
        elif os.path.isfile(text):
            teacher = ReDimNet.from_official_checkpoint(text)
        elif text.lower() in PRESETS:
            teacher = ReDimNet.from_preset(text.lower(), **overrides)
        else:
            raise ValueError(
                f"Unknown teacher {text!r}: expected a folder saved with save_pretrained, an official "
                f"ReDimNet .pt file, or one of the presets {sorted(PRESETS)}."
            )
    teacher.eval()
    if device is not None:
        teacher.to(device)
    return teacher
