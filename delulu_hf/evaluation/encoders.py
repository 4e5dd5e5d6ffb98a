"""Model spec in, an ``Encoder`` out: DELULU / transformers encoders, the ReDimNet teacher, MFCCs.

Every evaluation task reads, for each audio item, one vector per *stream* (a layer of an encoder,
or an utterance embedding) and, for the downstream x-vector task, the frame-level hidden states.
An ``Encoder`` turns a padded batch of 16 kHz waveforms into those named streams
(``delulu_hf.evaluation.features`` batches, pools and caches them). ``load_encoder`` picks one:

* a DELULU folder / Hub id, or any transformers audio encoder whose forward takes
  ``input_values`` (HuBERT, WavLM, wav2vec 2.0, ...): streams ``layer_0`` (the input embeddings)
  to ``layer_L`` (the last layer), from ``output_hidden_states=True``;
* a ReDimNet teacher (a ``save_pretrained`` folder or an official ``.pt`` checkpoint): streams
  ``frames`` (the pre-pooling frame features the DELULU labels come from) and ``embedding``
  (the teacher's own speaker embedding);
* ``mfcc``: a baseline that needs no model; streams ``mfcc`` (30 MFCCs per 10 ms frame) and
  ``mfcc_mean_std`` (utterance mean and standard deviation).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from delulu_hf.audio import TARGET_SAMPLING_RATE as SAMPLE_RATE
from delulu_hf.errors import UserError

__all__ = [
    "SAMPLE_RATE",
    "Encoder",
    "EncoderOutput",
    "MfccEncoder",
    "TeacherEncoder",
    "TransformersEncoder",
    "load_encoder",
]


@dataclass
class EncoderOutput:
    """What an encoder returns for one batch.

    ``frames[name]`` is ``(batch_size, num_frames, dim)`` with ``frame_lengths[i]`` valid frames for
    item i; ``embeddings[name]`` is ``(batch_size, dim)``.
    """

    frames: dict[str, torch.Tensor]
    frame_lengths: torch.Tensor
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


class Encoder:
    """Base class: turns a padded batch of 16 kHz waveforms into named streams.

    Subclasses set ``name`` (for results), ``kind``, ``frame_streams`` / ``embedding_streams``
    (the order is the order of ``per_layer`` results), ``primary`` (the stream reported as "the
    last layer"), ``frame_hop_seconds`` and ``min_samples``, and implement ``encode``.
    """

    name: str
    kind: str
    frame_streams: list[str]
    embedding_streams: list[str] = []
    primary: str
    frame_hop_seconds: float
    min_samples: int = 400
    device: torch.device = torch.device("cpu")

    @property
    def streams(self) -> list[str]:
        return list(self.frame_streams) + list(self.embedding_streams)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this encoder's outputs in the cache key (weights, settings)."""
        raise NotImplementedError

    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        """Encode ``(batch_size, num_samples)`` right-padded audio with ``lengths`` valid samples each."""
        raise NotImplementedError


def _files_fingerprint(folder: str | Path) -> list[tuple[str, int, int]]:
    """Name, size and modification time of the files in a model folder: changes when weights change."""
    folder = Path(folder)
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


class MfccEncoder(Encoder):
    """MFCC baseline: no model, no training; the floor every learned encoder should clear."""

    kind = "mfcc"

    def __init__(self, n_mfcc: int = 30, n_mels: int = 40, device: str | torch.device = "cpu") -> None:
        import torchaudio

        self.name = "mfcc"
        self.n_mfcc = n_mfcc
        self.n_mels = n_mels
        self.hop_length = 160
        self.device = torch.device(device)
        self.transform = torchaudio.transforms.MFCC(
            sample_rate=SAMPLE_RATE,
            n_mfcc=n_mfcc,
            melkwargs={"n_fft": 512, "win_length": 400, "hop_length": self.hop_length, "n_mels": n_mels},
        ).to(self.device)
        self.frame_streams = ["mfcc"]
        self.embedding_streams = ["mfcc_mean_std"]
        self.primary = "mfcc_mean_std"
        self.frame_hop_seconds = self.hop_length / SAMPLE_RATE

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_mfcc": self.n_mfcc, "n_mels": self.n_mels, "hop": self.hop_length}

    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        # One item at a time: the centred STFT reflects each item's own edges, so the result does not
        # depend on which other items share the batch (padding would change the last frames).
        per_item = [self.transform(w[:n].to(self.device)).T for w, n in zip(waveforms, lengths.tolist())]
        frame_lengths = torch.tensor([len(m) for m in per_item], device=self.device)
        mfcc = torch.nn.utils.rnn.pad_sequence(per_item, batch_first=True)  # (B, T, n_mfcc)
        mean = torch.stack([m.mean(0) for m in per_item])
        std = torch.stack([m.std(0) if len(m) > 1 else torch.zeros_like(m[0]) for m in per_item])
        return EncoderOutput(
            frames={"mfcc": mfcc},
            frame_lengths=frame_lengths,
            embeddings={"mfcc_mean_std": torch.cat([mean, std], dim=-1)},
        )


def _default_feature_extractor(config):
    """DELULU's input convention when a folder ships no ``preprocessor_config.json``; else None (raw audio)."""
    if getattr(config, "model_type", None) == "delulu":
        from delulu_hf import default_feature_extractor

        return default_feature_extractor(config)
    return None


class TransformersEncoder(Encoder):
    """Any transformers speech encoder that takes ``input_values``: every hidden state is a stream.

    Inputs are prepared by the model's own feature extractor when it ships one
    (``preprocessor_config.json``: normalisation, attention-mask convention), by DELULU's default
    one for a DELULU folder without it, and otherwise raw waveforms are passed with an attention
    mask.
    """

    kind = "transformers"

    def __init__(
        self, model_id: str, device: str | torch.device = "cpu", trust_remote_code: bool = False, dtype=None
    ) -> None:
        # DELULU is registered with the Auto classes by delulu_hf/__init__.py, already imported here.
        from transformers import AutoFeatureExtractor, AutoModel

        self.device = torch.device(device)
        model = AutoModel.from_pretrained(model_id, trust_remote_code=trust_remote_code, dtype=dtype)
        try:
            feature_extractor = AutoFeatureExtractor.from_pretrained(
                model_id, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError):
            feature_extractor = None
        self._setup(model.to(self.device), feature_extractor, model_id)
        self._in_memory = False

    @classmethod
    def from_model(cls, model, feature_extractor=None, name: str = "model") -> TransformersEncoder:
        """Wrap an in-memory model (tests, notebooks) without saving it first; its weights are hashed
        for the cache key."""
        self = cls.__new__(cls)
        self.device = next(model.parameters()).device
        self._setup(model, feature_extractor, name)
        self._in_memory = True
        return self

    def _setup(self, model, feature_extractor, name: str) -> None:
        from delulu_hf.configuration_delulu import receptive_field

        self.name = self.model_id = name
        self.model = model.eval()
        self.config = model.config
        self.feature_extractor = feature_extractor or _default_feature_extractor(self.config)
        self.frame_streams = [f"layer_{i}" for i in range(int(self.config.num_hidden_layers) + 1)]
        self.embedding_streams = []
        self.primary = self.frame_streams[-1]
        if hasattr(self.config, "conv_stride") and hasattr(self.config, "conv_kernel"):
            self.frame_hop_seconds = math.prod(self.config.conv_stride) / SAMPLE_RATE
            self.min_samples = receptive_field(self.config)  # shorter input gives no frame at all
        else:
            raise ValueError(
                f"{name}: {type(model).__name__} is not a convolutional speech encoder (no conv_stride/conv_kernel "
                "in its config); supported: DELULU, HuBERT, WavLM, wav2vec 2.0, data2vec-audio, ..."
            )

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {"kind": self.kind, "model": self.model_id, "config": self.config.to_diff_dict()}
        if os.path.isdir(self.model_id):
            fp["files"] = _files_fingerprint(self.model_id)
        if getattr(self, "_in_memory", False):  # weights only live in memory: hash them
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            fp["weights_sha256"] = digest.hexdigest()
        if self.feature_extractor is not None:
            fp["feature_extractor"] = self.feature_extractor.to_dict()
        return fp

    def _inputs(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.feature_extractor is None:
            mask = torch.arange(waveforms.shape[1])[None] < lengths[:, None]
            return {"input_values": waveforms, "attention_mask": mask.long()}
        arrays = [w[:n].numpy() for w, n in zip(waveforms, lengths.tolist())]
        inputs = self.feature_extractor(arrays, sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt")
        # Models trained without attention masks (group-norm wav2vec2/HuBERT Base) must not get one;
        # their extractor says so with return_attention_mask=False.
        return {k: v for k, v in inputs.items() if k in ("input_values", "attention_mask")}

    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        inputs = {k: v.to(self.device) for k, v in self._inputs(waveforms, lengths).items()}
        inputs["input_values"] = inputs["input_values"].to(self.model.dtype)
        out = self.model(**inputs, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        if hidden is None or len(hidden) != len(self.frame_streams):
            raise RuntimeError(
                f"{self.name}: expected {len(self.frame_streams)} hidden states with output_hidden_states=True, "
                f"got {None if hidden is None else len(hidden)}"
            )
        if hasattr(self.model, "_get_feat_extract_output_lengths"):
            frame_lengths = self.model._get_feat_extract_output_lengths(lengths.to(self.device))
        else:
            frame_lengths = torch.full((len(lengths),), hidden[-1].shape[1], device=self.device)
        frame_lengths = torch.clamp(frame_lengths.long(), min=1, max=hidden[-1].shape[1])
        return EncoderOutput(frames=dict(zip(self.frame_streams, hidden)), frame_lengths=frame_lengths)


class TeacherEncoder(Encoder):
    """A ReDimNet teacher (``delulu_hf.teacher.load_teacher``): its frame features and its embedding."""

    kind = "teacher"

    def __init__(self, spec: str, device: str | torch.device = "cpu") -> None:
        from delulu_hf.teacher import load_teacher

        self.name = str(spec)
        self.spec = str(spec)
        self.device = torch.device(device)
        self.teacher = load_teacher(spec, device=self.device)
        self.frame_streams = ["frames"]
        self.embedding_streams = ["embedding"]
        self.primary = "embedding"
        self.frame_hop_seconds = float(self.teacher.frame_hop_seconds)
        self.min_samples = 1024  # covers the centred STFT's reflection padding with room to spare

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {"kind": self.kind, "spec": self.spec}
        if os.path.isdir(self.spec):
            fp["files"] = _files_fingerprint(self.spec)
        elif os.path.isfile(self.spec):
            stat = os.stat(self.spec)
            fp["file"] = [stat.st_size, stat.st_mtime_ns]
        return fp

    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        waveforms, lengths = waveforms.to(self.device), lengths.to(self.device)
        frames = self.teacher.frame_features(waveforms, lengths)
        embedding = self.teacher(waveforms, lengths)
        frame_lengths = torch.clamp(self.teacher.frame_lengths(lengths), max=frames.shape[1])
        return EncoderOutput(
            frames={"frames": frames}, frame_lengths=frame_lengths, embeddings={"embedding": embedding}
        )


def _is_teacher_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "redimnet"


#: Weight files a local transformers folder may hold (one of them, or its shard index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def model_spec_problem(model: str, trust_remote_code: bool = False) -> str | None:
    """What is wrong with a *local* ``model`` spec, checked without loading it; ``None`` if nothing.

    ``mfcc``, Hub ids and paths that do not exist are not judged here (the caller decides whether a
    string is a path). A folder must hold a ``config.json`` with a ``model_type`` that transformers
    knows (DELULU is registered on import; ``redimnet`` is the teacher) and its weights; a file must
    be a ReDimNet ``.pt`` checkpoint. The answer reads after ``--model PATH: `` (one line).
    """
    path = Path(model)
    if model.lower() == "mfcc" or not path.exists():
        return None
    if path.is_file():
        return None if path.suffix == ".pt" else "a file, but not a ReDimNet .pt checkpoint"
    config_path = path / "config.json"
    if not config_path.is_file():
        below = sorted(str(p.parent) for p in path.glob("*/config.json"))
        hint = f"; did you mean {below[0]}?" if below else ""
        return f"no config.json: not a model folder{hint}"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"config.json is not valid JSON ({err})"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        return "config.json has no model_type: not a transformers model folder"
    if model_type == "redimnet":
        return None
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING and not (trust_remote_code and config.get("auto_map")):
        return f"model_type {model_type!r} is not a transformers model (a folder with its own code needs --trust_remote_code)"
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        return f"a {model_type} config.json but no weights ({WEIGHT_FILES[0]})"
    return None


def load_encoder(
    model: str, device: str | torch.device = "cpu", trust_remote_code: bool = False, dtype=None
) -> Encoder:
    """Pick the encoder for a model spec.

    ``"mfcc"`` is the baseline; a folder whose ``config.json`` says ``model_type: redimnet`` or a
    ``.pt`` file is a ReDimNet teacher; anything else is passed to ``transformers.AutoModel``
    (a local DELULU folder, a Hub id, ...). Nothing is downloaded unless ``model`` is a Hub id.
    """
    if model.lower() == "mfcc":
        return MfccEncoder(device=device)
    path = Path(model)
    if (path.is_dir() and _is_teacher_folder(path)) or (path.is_file() and path.suffix == ".pt"):
        return TeacherEncoder(model, device=device)
    problem = model_spec_problem(model, trust_remote_code)
    if problem is not None:
        raise UserError(f"model {model}: {problem}")
    try:
        return TransformersEncoder(model, device=device, trust_remote_code=trust_remote_code, dtype=dtype)
    except OSError as err:
        if path.exists():  # a local folder that passed the checks above but does not load: a program error
            raise
        # Not on disk, so a Hub id: a typo, a private repo or no network are the user's to fix.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"model {model}: no such local folder, and loading it as a Hub id failed: {reason}"
        ) from err
