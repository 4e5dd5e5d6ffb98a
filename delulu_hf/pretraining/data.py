"""A labelled dataset in, an endless, sharded and resumable stream of collated batches out.

``LengthBucketBatchSampler`` plans each epoch's batches by total padded samples, deterministically
per ``(seed, epoch)``; process ``rank`` takes every ``num_replicas``-th batch, and a stream position
``(epoch, batch index)`` saved with a checkpoint resumes it exactly. Each planned batch carries its
own seed (``batch_seed``), which ``PretrainingItems`` hands to the collator with the decoded audio.
``PretrainingBatches`` assembles a planned batch: every item is decoded and checked, and a bad one
(``on_error: skip``) is replaced by the next good item of the plan that fits the batch's budget, a
choice that depends only on the plan and the files, so a resumed run refills exactly as the
uninterrupted one did.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from delulu_hf.augment import NoiseSource
from delulu_hf.configuration_delulu import feat_extract_output_lengths, receptive_field
from delulu_hf.errors import UserError
from delulu_hf.pretraining.arguments import SAMPLE_RATE
from delulu_hf.pretraining.collator import DeluluPretrainingCollator
from delulu_hf.pretraining.labelled import LabelledData, label_frame_counts

if TYPE_CHECKING:
    from delulu_hf.pretraining.arguments import PretrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "LengthBucketBatchSampler",
    "PretrainingBatches",
    "PretrainingItems",
    "batch_seed",
    "make_dataloader",
]


def batch_seed(seed: int, epoch: int, batch_index: int) -> int:
    """The seed of one batch's crops, corruption and masks (independent of process count)."""
    return int(np.random.SeedSequence([seed, epoch, batch_index]).generate_state(1)[0])


class LengthBucketBatchSampler:
    """An endless stream of batches whose padded size stays under ``max_batch_samples``.

    Each epoch: lengths (capped at the crop length) are jittered by ``exp(U(-jitter, jitter))``,
    sorted, and packed greedily so that ``len(batch) * max(length) <= max_batch_samples``; the
    batch order is then shuffled. The plan depends only on ``(seed, epoch)``. It is cut to a
    multiple of ``drop_multiple`` (``num_processes * gradient_accumulation_steps``), so all processes
    stay in lockstep and an optimizer step never spans two epochs; process ``rank`` takes global
    batches ``rank, rank + num_replicas, ...``. Each yielded batch is a list of
    ``(item_index, batch_seed, epoch, global_batch_index)`` tuples (see ``PretrainingItems``).
    ``start=(epoch, global_batch_index)`` resumes the stream exactly where a checkpoint left it.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_batch_samples: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_multiple: int = 1,
        start: tuple[int, int] = (0, 0),
        jitter: float = 0.1,
        shuffle: bool = True,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.size == 0:
            raise ValueError("no items to batch (the dataset is empty after filtering)")
        if self.lengths.max() > max_batch_samples:
            raise ValueError(
                f"an item has {self.lengths.max()} samples, more than max_batch_samples={max_batch_samples}"
            )
        self.max_batch_samples = int(max_batch_samples)
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.drop_multiple = max(int(drop_multiple), self.num_replicas)
        if self.drop_multiple % self.num_replicas:
            raise ValueError("drop_multiple must be a multiple of num_replicas")
        self.start = (int(start[0]), int(start[1]))
        self.jitter, self.shuffle = float(jitter), shuffle
        self._cache: tuple[int, list[np.ndarray]] | None = None
        if not self.epoch_batches(0):
            raise ValueError(
                f"{len(self.lengths)} items make fewer than {self.drop_multiple} batches (processes x gradient "
                "accumulation): add data or lower max_batch_samples"
            )

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The global plan of ``epoch`` (cut to a multiple of ``drop_multiple``)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch, 7])
        if self.shuffle and self.jitter > 0:
            keys = self.lengths * np.exp(rng.uniform(-self.jitter, self.jitter, size=self.lengths.size))
        else:
            keys = self.lengths.astype(np.float64)
        tiebreak = rng.permutation(self.lengths.size) if self.shuffle else np.arange(self.lengths.size)
        order = tiebreak[np.argsort(keys[tiebreak], kind="stable")]
        batches: list[np.ndarray] = []
        current: list[int] = []
        longest = 0
        for index in order:
            length = int(self.lengths[index])
            if current and (len(current) + 1) * max(longest, length) > self.max_batch_samples:
                batches.append(np.asarray(current))
                current, longest = [], 0
            current.append(int(index))
            longest = max(longest, length)
        if current:
            batches.append(np.asarray(current))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        batches = batches[: len(batches) - len(batches) % self.drop_multiple]
        self._cache = (epoch, batches)
        return batches

    def advance(self, position: tuple[int, int], num_global_batches: int) -> tuple[int, int]:
        """The stream position ``num_global_batches`` after ``position``."""
        epoch, index = position
        index += num_global_batches
        while index >= len(self.epoch_batches(epoch)):
            index -= len(self.epoch_batches(epoch))
            epoch += 1
        return epoch, index

    def refill_candidates(self, epoch: int, batch_index: int, max_length: int) -> Iterator[int]:
        """Items that may stand in for a bad item of batch ``batch_index``: those of the following
        batches of the epoch's plan (wrapping around), in plan order, no longer than ``max_length``
        (the batch's longest planned item, so the sample budget still holds)."""
        batches = self.epoch_batches(epoch)
        for offset in range(1, len(batches)):
            for index in batches[(batch_index + offset) % len(batches)]:
                if self.lengths[index] <= max_length:
                    yield int(index)

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        epoch, index = self.advance(self.start, 0)
        while True:
            batches = self.epoch_batches(epoch)
            first = index + (self.rank - index) % self.num_replicas
            for b in range(first, len(batches), self.num_replicas):
                seed = batch_seed(self.seed, epoch, b)
                yield [(int(i), seed, epoch, b) for i in batches[b]]
            epoch, index = epoch + 1, 0


class PretrainingItems(torch.utils.data.Dataset):
    """Decoded waveform + cluster ids per item; keys are the tuples ``LengthBucketBatchSampler`` yields.

    With a model ``config``, ``checked`` also verifies an item against the encoder: at least one
    receptive field of audio, one cluster id per encoder frame.
    """

    def __init__(self, dataset, audio_column: str = "audio", label_column: str = "cluster_ids", config=None):
        self.dataset = dataset
        self.audio_column, self.label_column = audio_column, label_column
        self.name_column = next((c for c in ("file_name", "path", "id") if c in dataset.column_names), None)
        self.config = config

    def __len__(self) -> int:
        return len(self.dataset)

    def _name(self, row: dict, index: int) -> str:
        if self.name_column:
            return str(row[self.name_column])
        audio = row.get(self.audio_column)
        path = audio.get("path") if isinstance(audio, dict) else None
        return str(path) if path else f"item #{index}"

    def __getitem__(self, key) -> dict[str, Any]:
        from delulu_hf.audio import load_audio

        index, seed, epoch, batch_index = key if isinstance(key, tuple) else (key, 0, 0, 0)
        row = self.dataset[int(index)]
        name = self._name(row, int(index))
        min_samples = receptive_field(self.config) if self.config is not None else 0
        return {
            "input_values": load_audio(
                row[self.audio_column], SAMPLE_RATE, name=name, min_samples=min_samples
            ),
            "labels": np.asarray(row[self.label_column], dtype=np.int64),
            "name": name,
            "seed": seed,
            "epoch": epoch,
            "batch_index": batch_index,
        }

    def names(self) -> list[str]:
        """Every item's name (file name, path or id column, else the audio path), without decoding."""
        if self.name_column:
            return [str(value) for value in self.dataset[self.name_column]]
        return item_names(self.dataset, self.audio_column)

    def checked(self, key) -> tuple[dict[str, Any] | None, str, str]:
        """``(item, name, "")``, or ``(None, name, reason)`` for an item that cannot be trained on."""
        from delulu_hf.audio import AudioDecodeError

        try:
            item = self[key]
        except AudioDecodeError as err:
            index = int(key[0] if isinstance(key, tuple) else key)
            return None, self._name(self.dataset.with_format(None)[index], index), str(err)
        if self.config is not None:
            samples, ids = len(item["input_values"]), len(item["labels"])
            frames = feat_extract_output_lengths(self.config, samples)
            if ids != frames:
                reason = (
                    f"{ids} cluster ids for {samples} samples, but the encoder makes {frames} frames "
                    "(labels made for other audio or another conv stack)"
                )
                return None, item["name"], reason
        return item, item["name"], ""


def item_names(dataset, audio_column: str = "audio") -> list[str]:
    """Names of a dataset's items: a ``file_name``/``path``/``id`` column, else the audio path, else
    ``item #i`` (read from Arrow: nothing is decoded)."""
    import pyarrow.compute as pc

    for column in ("file_name", "path", "id"):
        if column in dataset.column_names:
            return [str(value) for value in dataset[column]]
    names: list[str] = []
    if audio_column in dataset.column_names:
        table = dataset.with_format("arrow")
        for batch in table.iter(batch_size=10_000):
            audio = batch[audio_column]
            try:
                paths = pc.struct_field(audio, "path").to_pylist()
            except (KeyError, ValueError, TypeError, NotImplementedError):
                paths = [None] * len(audio)
            names += [p if p else f"item #{len(names) + i}" for i, p in enumerate(paths)]
        return names
    return [f"item #{i}" for i in range(len(dataset))]


def _as_is(batch: Any) -> Any:
    return batch


class PretrainingBatches(torch.utils.data.Dataset):
    """A planned batch (``LengthBucketBatchSampler`` keys) in, its checked items collated out.

    Every item goes through ``PretrainingItems.checked``. A bad one is listed in the batch's
    ``skipped`` (``(name, reason)`` pairs, for the run's ledger, which stops the run under
    ``on_error: raise``) and replaced by the first good item of ``sampler.refill_candidates`` not
    already in the batch (at most ``max_tries`` tried per batch). The stand-ins keep the planned
    batch's seed, epoch and index, so the stream position, and every draw of the collator, depend
    only on the plan and the files: a resumed or multi-process run refills exactly as the
    uninterrupted one.
    """

    def __init__(
        self, items: PretrainingItems, sampler: LengthBucketBatchSampler, collator, max_tries: int = 64
    ):
        self.items, self.sampler, self.collator = items, sampler, collator
        self.max_tries = int(max_tries)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, planned: list[tuple[int, int, int, int]]) -> dict[str, Any]:
        _, seed, epoch, batch_index = planned[0]
        good, skipped = [], []
        for key in planned:
            item, name, reason = self.items.checked(key)
            if item is None:
                skipped.append((name, reason))
            else:
                good.append(item)
        missing = len(planned) - len(good)
        if missing:
            used = {index for index, *_ in planned}
            longest = int(max(self.sampler.lengths[index] for index in used))
            stand_ins = (
                i for i in self.sampler.refill_candidates(epoch, batch_index, longest) if i not in used
            )
            for tries, index in enumerate(stand_ins):
                if missing == 0 or tries >= self.max_tries:
                    break
                item, name, reason = self.items.checked((index, seed, epoch, batch_index))
                if item is None:
                    skipped.append((name, reason))
                else:
                    good.append(item)
                    missing -= 1
        if not good:
            err = UserError(
                f"batch {batch_index} of epoch {epoch}: none of its {len(planned)} items nor {self.max_tries} "
                f"stand-ins can be used (e.g. {skipped[0][0]}: {skipped[0][1]}); check the corpus"
            )
            err.rank_specific = True  # met by this process alone: it prints the line
            raise err
        batch = self.collator(good)
        batch["skipped"] = skipped
        return batch


def make_dataloader(
    data: LabelledData,
    model_config,
    cfg: PretrainConfig,
    num_replicas: int = 1,
    rank: int = 0,
    start: tuple[int, int] = (0, 0),
) -> tuple[torch.utils.data.DataLoader, LengthBucketBatchSampler]:
    """The endless, sharded, resumable loader of pretraining batches (no global RNG is used).

    Items shorter than ``min_sample_length`` (counted from their labels) are left out here and
    recorded in ``data.skipped`` (stage ``length``). Each batch is a collated dict plus ``skipped``:
    the ``(name, reason)`` of bad items met while assembling it (see ``PretrainingBatches``).
    """
    frames = label_frame_counts(data.dataset)
    hop, field = int(model_config.inputs_to_logits_ratio), receptive_field(model_config)
    samples = np.minimum((frames - 1) * hop + field, cfg.max_sample_length)  # lower bound of the true length
    min_frames = max(
        feat_extract_output_lengths(model_config, cfg.min_sample_length), model_config.mask_time_length
    )
    keep = np.flatnonzero(frames >= min_frames)
    if len(keep) < len(frames):
        names = PretrainingItems(data.dataset.select(np.flatnonzero(frames < min_frames).tolist())).names()
        logger.info(
            "Dropping %d item(s) shorter than min_sample_length (%d samples), e.g. %s",
            len(names),
            cfg.min_sample_length,
            names[0],
        )
        if data.skipped is not None:
            for name in names:
                data.skipped.add(name, "shorter than min_sample_length", "length", quiet=True)
    sampler = LengthBucketBatchSampler(
        samples[keep],
        cfg.max_batch_samples,
        seed=cfg.seed,
        num_replicas=num_replicas,
        rank=rank,
        drop_multiple=num_replicas * cfg.gradient_accumulation_steps,
        start=start,
        jitter=cfg.bucket_jitter,
    )
    items = PretrainingItems(
        data.dataset.select(keep.tolist()) if len(keep) < len(frames) else data.dataset, config=model_config
    )
    collator = DeluluPretrainingCollator(
        model_config,
        cfg.max_sample_length,
        crop_to_shortest=cfg.crop_to_shortest,
        noise=NoiseSource(cfg.noise_dir),
        normalize_audio=cfg.normalize_audio,
        keep_clean=model_config.distill_loss_weight > 0,
    )
    loader = torch.utils.data.DataLoader(
        PretrainingBatches(items, sampler, collator),
        sampler=sampler,  # yields whole planned batches: PretrainingBatches assembles each one
        batch_size=None,
        collate_fn=_as_is,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global torch RNG untouched
    )
    return loader, sampler
