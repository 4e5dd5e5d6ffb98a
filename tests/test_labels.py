"""Tests of the label pipeline (delulu_hf.labels, training/prepare_labels.py).

Everything runs on generated audio with cheap featurizers (MFCC, or a fake teacher whose frame
features change at known samples), so the whole file takes well under a minute on 2 cores.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import normalized_mutual_info_score

from delulu_hf import labels
from delulu_hf.audio import AudioDecodeError
from delulu_hf.configuration_delulu import DeluluConfig
from delulu_hf.modeling_delulu import feat_extract_output_lengths, receptive_field
from delulu_hf.teacher import SpeakerTeacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000


def small_config(k: int = 8, **label_fields) -> DeluluConfig:
    """Default geometry and ``num_clusters=k``; other label provenance fields unchecked unless given."""
    fields = {"num_clusters": k, "label_teacher_name": None, "label_feature_dim": None}
    fields.update(label_fields)
    return DeluluConfig(**fields)


DEFAULT = small_config(8)
K4 = small_config(4)


class ChangePointTeacher(SpeakerTeacher):
    """Frame ``j`` = one-hot of the waveform's level at sample ``j * hop``.

    Fed a piecewise-constant signal (levels 0..L-1), its features change exactly at known samples,
    so any misalignment between teacher and encoder frames shows up as wrong labels.
    """

    name = "change-points"

    def __init__(self, levels: int = 4):
        super().__init__()
        self.feature_dim = levels
        self.calls = 0

    def frame_features(self, waveforms, lengths=None):
        self.calls += 1
        num_frames = 1 + waveforms.shape[1] // self.hop_length
        positions = torch.clamp(torch.arange(num_frames) * self.hop_length, max=waveforms.shape[1] - 1)
        level = waveforms[:, positions].round().long().clamp(0, self.feature_dim - 1)
        return F.one_hot(level, self.feature_dim).float()


class CountingMFCC(labels.MFCCFeatures):
    """MFCC featurizer that counts teacher calls (to prove cached re-runs do no work)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def frame_features(self, waveforms, lengths=None):
        self.calls += 1
        return super().frame_features(waveforms, lengths)


def identity_centroids(levels: int, teacher: SpeakerTeacher, alignment: str) -> labels.Centroids:
    info = labels.featurizer_provenance(teacher)
    return labels.Centroids(
        torch.eye(levels), {"teacher": info, "alignment": alignment, "normalization": "none"}
    )


def voice(seconds: float, pitch: float, rng: np.random.Generator) -> np.ndarray:
    """A crude 'speaker': harmonics of ``pitch`` with a slow envelope plus a little noise."""
    t = np.arange(int(seconds * SR)) / SR
    wave = sum(np.sin(2 * np.pi * pitch * h * t + rng.uniform(0, 6)) / h for h in range(1, 6))
    wave *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t) ** 2
    return (0.1 * wave + 0.005 * rng.standard_normal(len(t))).astype(np.float32)


def voice_dataset(num_items: int = 16, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    pitches = [110.0, 180.0, 260.0, 330.0]
    audio, speakers = [], []
    for i in range(num_items):
        audio.append({"array": voice(rng.uniform(0.3, 1.5), pitches[i % 4], rng), "sampling_rate": SR})
        speakers.append(f"spk{i % 4}")
    return datasets.Dataset.from_dict({"audio": audio, "speaker_id": speakers})


@pytest.fixture(scope="module")
def mfcc_centroids() -> labels.Centroids:
    return labels.fit_centroids(
        voice_dataset(12, seed=1), labels.MFCCFeatures(), DEFAULT, k=8, max_frames=500, n_init=2, verbose=-1
    )


# ---------------------------------------------------------------------------------------------
# Frame counts and alignment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel,stride",
    [
        ((10, 3, 3, 3, 3, 2, 2), (4, 2, 2, 2, 2, 2, 2)),
        ((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)),
        ((4, 3), (2, 3)),
    ],
)
def test_frame_counts_match_model_over_many_lengths(kernel, stride):
    config = DeluluConfig(conv_kernel=kernel, conv_stride=stride, conv_dim=(8,) * len(kernel))
    frames = labels.EncoderFrames.from_config(config)
    field, hop = receptive_field(config), frames.hop
    assert frames.receptive_field == field
    rng = np.random.default_rng(0)
    lengths = set(range(field - 3, field + 3 * hop + 3))  # every length across the first frame boundaries
    for m in range(1, 400, 7):  # just around the length where frame m+1 appears
        lengths.update({field + m * hop - 1, field + m * hop, field + m * hop + 1})
    lengths.update(rng.integers(field, 16000 * 40, 2000).tolist())
    lengths = sorted(lengths)
    expected = feat_extract_output_lengths(config, torch.tensor(lengths))
    for n, e in zip(lengths, expected.tolist()):
        assert frames.num_frames(n) == e == feat_extract_output_lengths(config, n), n
        # A frame exists exactly when its whole receptive field fits.
        assert (frames.num_frames(n) >= 1) == (n >= field)
    assert labels.EncoderFrames.from_config(DEFAULT).num_frames(SR) == 62


def test_mapped_column_length_equals_model_frame_count():
    """End to end: lengths around receptive-field boundaries through decode, teacher and map."""
    frames = labels.EncoderFrames.from_config(DEFAULT)
    field, hop = frames.receptive_field, frames.hop
    lengths = [field, field + 1, field + hop - 1, field + hop, field + hop + 1, 1601, 16000, 16001, 23999]
    rng = np.random.default_rng(3)
    audio = [{"array": 0.1 * rng.standard_normal(n).astype(np.float32), "sampling_rate": SR} for n in lengths]
    teacher = ChangePointTeacher()
    centroids = identity_centroids(4, teacher, "nearest")
    for alignment in labels.ALIGNMENTS:
        centroids.provenance["alignment"] = alignment
        out = labels.add_cluster_ids(
            datasets.Dataset.from_dict({"audio": audio}),
            teacher,
            centroids,
            small_config(4, label_frame_alignment=alignment),
            chunk_size=4,
        )
        assert [len(ids) for ids in out["cluster_ids"]] == [
            feat_extract_output_lengths(DEFAULT, n) for n in lengths
        ]


def levels_signal(change_points: list[int], num_samples: int) -> np.ndarray:
    """Level 0 until the first change point, then 1, 2, ... (cycling through 4 levels)."""
    signal = np.zeros(num_samples, dtype=np.float32)
    for i, point in enumerate(change_points):
        signal[point:] = (i + 1) % 4
    return signal


@pytest.mark.parametrize("alignment", labels.ALIGNMENTS)
def test_alignment_on_synthetic_change_points(alignment):
    frames = labels.EncoderFrames.from_config(DEFAULT)
    hop = 160
    num_samples = 20011
    change_points = [1234, 4000, 4100, 9999, 15360, 19000]
    signal = levels_signal(change_points, num_samples)
    teacher = ChangePointTeacher()
    out = labels.add_cluster_ids(
        datasets.Dataset.from_dict({"audio": [{"array": signal, "sampling_rate": SR}]}),
        teacher,
        identity_centroids(4, teacher, alignment),
        small_config(4, label_frame_alignment=alignment),
    )
    ids = np.array(out["cluster_ids"][0])
    num_frames = frames.num_frames(num_samples)
    assert len(ids) == num_frames
    for i, label in enumerate(ids):
        start = i * frames.hop
        centre = start + frames.receptive_field / 2
        if alignment == "nearest":
            # The teacher frame nearest the centre samples the signal at round(centre / hop) * hop.
            assert label == signal[int(np.floor(centre / hop + 0.5)) * hop], i
            # Away from change points that is simply the level at the encoder frame's centre.
            if min(abs(centre - p) for p in change_points) > hop / 2:
                assert label == signal[int(centre)], i
        else:
            # Mean over the teacher frames centred in the span, then nearest one-hot = majority level
            # (ties: the lowest level, as argmin takes the first minimum).
            centres = [
                j * hop
                for j in range(num_samples // hop + 1)
                if start <= j * hop < start + frames.receptive_field
            ]
            votes = np.bincount(signal[centres].astype(int), minlength=4)
            assert label == int(np.argmax(votes)), i
            if all(not (start <= p < start + frames.receptive_field) for p in change_points):
                assert label == signal[start], i
    # Every change of label happens within half an encoder hop + half a teacher hop of a change point.
    for i in np.flatnonzero(np.diff(ids)) + 1:
        boundary = i * frames.hop + frames.receptive_field / 2 - frames.hop / 2
        assert min(abs(boundary - p) for p in change_points) <= frames.hop / 2 + hop


def test_alignment_index_geometry(tmp_path):
    frames = labels.EncoderFrames.from_config(DEFAULT)
    for n in (322, 1000, 16000, 16000 * 7 + 5):
        index, weight = labels.alignment_index(n, frames, 160, "nearest")
        centres = frames.centres(frames.num_frames(n))
        assert index.shape == (frames.num_frames(n), 1)
        assert np.all(np.abs(index[:, 0] * 160 - centres) <= 80)
        assert index.max() <= n // 160
        index, weight = labels.alignment_index(n, frames, 160, "mean")
        np.testing.assert_allclose(weight.sum(1), 1.0, rtol=1e-6)
        for i in range(len(index)):
            used = set(index[i][weight[i] > 0].tolist())
            start = i * frames.hop
            assert used == {
                j for j in range(n // 160 + 1) if start <= j * 160 < start + frames.receptive_field
            }
    info = labels.plot_alignment(16000, frames, 160, "nearest", tmp_path / "alignment.png")
    assert info["max_abs_offset_ms"] <= 5.0 and info["encoder_frames"] == 62
    assert os.path.getsize(tmp_path / "alignment.png") > 0


# ---------------------------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------------------------


def test_torch_assignment_equals_sklearn_predict():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((16, 64)).astype(np.float32) * 3
    train = (centres[rng.integers(0, 16, 4000)] + rng.standard_normal((4000, 64))).astype(np.float32)
    kmeans = MiniBatchKMeans(16, n_init=3, batch_size=1000, random_state=0).fit(train)
    test = (centres[rng.integers(0, 16, 9000)] + 2.0 * rng.standard_normal((9000, 64))).astype(np.float32)
    assigner = labels.ClusterAssigner(torch.from_numpy(kmeans.cluster_centers_), chunk_size=777)
    ours = assigner(torch.from_numpy(test)).numpy()
    np.testing.assert_array_equal(ours, kmeans.predict(test))
    np.testing.assert_array_equal(assigner(test).numpy(), ours)  # numpy input too
    # Exact ties (a duplicated centroid) go to the lower index. scikit-learn's own choice between
    # equal centroids depends on GEMM rounding, so it agrees up to that tie.
    duplicated = np.concatenate([kmeans.cluster_centers_, kmeans.cluster_centers_[:1]])
    kmeans.cluster_centers_ = duplicated
    tied = labels.ClusterAssigner(torch.from_numpy(duplicated))(test).numpy()
    np.testing.assert_array_equal(tied, ours)
    np.testing.assert_array_equal(np.where(kmeans.predict(test) == 16, 0, kmeans.predict(test)), tied)


# ---------------------------------------------------------------------------------------------
# Centroid files
# ---------------------------------------------------------------------------------------------


def test_centroid_save_load_without_pickle(tmp_path, monkeypatch, mfcc_centroids):
    path = mfcc_centroids.save(tmp_path / "km")
    assert path.endswith("centroids.safetensors") and os.path.isfile(tmp_path / "km" / "centroids.json")
    assert not [f for f in os.listdir(tmp_path / "km") if f.startswith(".tmp")]

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling is not allowed")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = labels.Centroids.load(path)
    torch.testing.assert_close(loaded.centroids, mfcc_centroids.centroids)
    assert loaded.k == 8 and loaded.dim == 39
    provenance = loaded.provenance
    assert provenance["teacher"]["name"] == "mfcc" and len(provenance["teacher"]["checkpoint_sha256"]) == 64
    assert provenance["kmeans"]["sklearn_version"] and provenance["kmeans"]["batch_size"] == 10000
    assert provenance["kmeans"]["max_no_improvement"] == 100 and provenance["kmeans"]["init"] == "k-means++"
    assert provenance["frames_used"] == 500 and provenance["frames_seen"] > 500
    assert provenance["normalization"] == "none" and provenance["alignment"] == "nearest"
    assert provenance["centroids_sha256"] == loaded.sha256()
    # A safetensors file of something else is refused.
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a delulu-centroids file"):
        labels.Centroids.load(tmp_path / "other.safetensors")


def test_mismatches_fail_before_any_work(mfcc_centroids):
    teacher = CountingMFCC()
    data = voice_dataset(2)
    cases = [
        (small_config(16), teacher, {}, "num_clusters=16"),
        (small_config(label_feature_dim=2304), teacher, {}, "label_feature_dim=2304"),
        (small_config(label_teacher_name="redimnet-b6"), teacher, {}, "label_teacher_name='redimnet-b6'"),
        (small_config(label_frame_alignment="mean"), teacher, {}, "label_frame_alignment='mean'"),
        (DEFAULT, ChangePointTeacher(levels=39), {}, "fitted on 'mfcc' features"),
        (DEFAULT, ChangePointTeacher(levels=5), {}, "gives 5-d features but the centroids are 39-d"),
        (DEFAULT, teacher, {"alignment": "mean"}, "'nearest'-aligned features, not 'mean'"),
        (DEFAULT, teacher, {"normalization": "l2"}, "normalization='none'"),
    ]
    for config, featurizer, kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            labels.add_cluster_ids(data, featurizer, mfcc_centroids, config, **kwargs)
    other_weights = labels.MFCCFeatures(n_mels=30)
    with pytest.raises(ValueError, match="other weights"):
        labels.add_cluster_ids(data, other_weights, mfcc_centroids, DEFAULT)
    with pytest.raises(ValueError, match="num_clusters=256 but k is 8"):
        labels.fit_centroids(data, teacher, small_config(256), k=8)
    assert teacher.calls == 0


# ---------------------------------------------------------------------------------------------
# Bad input, MFCC control, caching, diagnostics
# ---------------------------------------------------------------------------------------------


def flac_bytes(wave: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, SR, format="FLAC")
    return buffer.getvalue()


def raw_dataset() -> datasets.Dataset:
    """Undecoded audio (as ``Audio(decode=False)`` gives it) with a corrupt and a too-short item."""
    rng = np.random.default_rng(5)
    items, names = [], []
    for i in range(6):
        names.append(f"utt{i}.flac")
        items.append({"bytes": flac_bytes(voice(0.6, 150 + 40 * i, rng)), "path": names[-1]})
    items[2] = {"bytes": b"this is not audio at all", "path": "broken.flac"}
    names[2] = "broken.flac"
    items[4] = {"bytes": flac_bytes(np.zeros(200, dtype=np.float32)), "path": "tiny.flac"}
    names[4] = "tiny.flac"
    data = datasets.Dataset.from_dict({"audio": items, "file_name": names, "speaker_id": ["a", "b"] * 3})
    return data.cast_column("audio", datasets.Audio(decode=False))


def test_on_error_raise_names_item_and_skip_counts_it(tmp_path, mfcc_centroids):
    teacher = labels.MFCCFeatures()
    with pytest.raises(AudioDecodeError, match=r"item 2 \(broken.flac\)"):
        labels.add_cluster_ids(raw_dataset(), teacher, mfcc_centroids, DEFAULT)
    skipped: list[labels.LabelSkip] = []
    out = labels.add_cluster_ids(
        raw_dataset(), teacher, mfcc_centroids, DEFAULT, on_error="skip", skipped=skipped, chunk_size=4
    )
    assert [s.name for s in skipped] == ["broken.flac", "tiny.flac"] and [s.index for s in skipped] == [2, 4]
    assert "too short" in skipped[1].reason
    ids = out["cluster_ids"]
    assert ids[2] is None and ids[4] is None
    assert all(len(ids[i]) == feat_extract_output_lengths(DEFAULT, int(0.6 * SR)) for i in (0, 1, 3, 5))
    assert isinstance(out.features["audio"], datasets.Audio) and not out.features["audio"].decode
    assert labels.skipped_items(out) == [
        {"index": 2, "name": "broken.flac"},
        {"index": 4, "name": "tiny.flac"},
    ]
    report = labels.write_report(
        tmp_path / "report", out, mfcc_centroids, DEFAULT, teacher_hop=160, skipped=skipped
    )
    assert report["skipped_count"] == 2 and report["skipped"][0]["reason"]
    assert report["diagnostics"]["items"] == 4 and report["diagnostics"]["skipped_items"] == 2
    for name in ("occupancy.png", "occupancy.json", "alignment.png", "alignment.json", "report.json"):
        assert os.path.getsize(tmp_path / "report" / name) > 0
    # The fit also skips and records bad items.
    centroids = labels.fit_centroids(raw_dataset(), teacher, K4, k=4, n_init=1, on_error="skip", verbose=-1)
    assert [s["name"] for s in centroids.provenance["skipped"]] == ["broken.flac", "tiny.flac"]
    assert centroids.provenance["items_used"] == 4


def test_mfcc_features_and_batch_invariance():
    featurizer = labels.load_featurizer("mfcc")
    assert isinstance(featurizer, labels.MFCCFeatures) and featurizer.feature_dim == 39
    assert featurizer.frame_hop_seconds == 0.01
    rng = np.random.default_rng(2)
    short, long = voice(0.5, 200, rng), voice(1.2, 120, rng)
    batch = torch.zeros(2, len(long))
    batch[0, : len(short)] = torch.from_numpy(short)
    batch[1] = torch.from_numpy(long)
    together = featurizer.frame_features(batch, torch.tensor([len(short), len(long)]))
    alone = featurizer.frame_features(torch.from_numpy(short)[None])
    assert together.shape == (2, 1 + len(long) // 160, 39) and alone.shape[1] == 1 + len(short) // 160
    torch.testing.assert_close(together[0, : alone.shape[1]], alone[0])
    assert torch.isfinite(together).all()


def test_mfcc_pipeline_and_cached_rerun(tmp_path):
    data_dir = str(tmp_path / "data")
    voice_dataset(12).save_to_disk(data_dir)
    data = datasets.load_from_disk(data_dir)  # disk-backed, so map results are cached
    teacher = CountingMFCC()
    centroids = labels.fit_centroids(
        data, teacher, DEFAULT, k=8, max_frames=3000, n_init=2, seed=1, verbose=-1
    )
    calls_after_fit = teacher.calls
    first = labels.add_cluster_ids(data, teacher, centroids, DEFAULT, chunk_size=5)
    assert teacher.calls > calls_after_fit
    calls = teacher.calls
    again = labels.add_cluster_ids(
        datasets.load_from_disk(data_dir), CountingMFCC(), centroids, DEFAULT, chunk_size=5
    )
    assert again["cluster_ids"] == first["cluster_ids"]
    fresh = CountingMFCC()
    labels.add_cluster_ids(datasets.load_from_disk(data_dir), fresh, centroids, DEFAULT, chunk_size=5)
    assert fresh.calls == 0 and teacher.calls == calls  # the re-run loaded the cache
    labels.add_cluster_ids(data, fresh, centroids, DEFAULT, chunk_size=3)  # other batching: recomputed
    assert fresh.calls > 0
    frames = labels.EncoderFrames.from_config(DEFAULT)
    for item, ids in zip(data, first["cluster_ids"]):
        assert len(ids) == frames.num_frames(len(item["audio"]["array"]))
        assert min(ids) >= 0 and max(ids) < 8
    # MFCC clusters of these 4 'voices' (different pitches) carry speaker information.
    diagnostics = labels.cluster_diagnostics(first["cluster_ids"], 8, first["speaker_id"])
    assert diagnostics["speaker"]["nmi"] > 0.05 and diagnostics["perplexity"] > 2


def test_iterable_dataset_and_fit_hours(mfcc_centroids):
    data = voice_dataset(10, seed=4)
    teacher = labels.MFCCFeatures()
    fit_kwargs = dict(k=8, max_frames=300, n_init=1, seed=3, chunk_size=4, verbose=-1)
    mapped = labels.fit_centroids(data, teacher, DEFAULT, **fit_kwargs)
    streamed = labels.fit_centroids(data.to_iterable_dataset(), teacher, DEFAULT, **fit_kwargs)
    torch.testing.assert_close(streamed.centroids, mapped.centroids)
    assert streamed.provenance["frames_seen"] == mapped.provenance["frames_seen"]
    lazy = labels.add_cluster_ids(data.to_iterable_dataset(), teacher, mfcc_centroids, DEFAULT, chunk_size=4)
    eager = labels.add_cluster_ids(data, teacher, mfcc_centroids, DEFAULT, chunk_size=4)
    assert [row["cluster_ids"] for row in lazy] == eager["cluster_ids"]
    # fit_hours reads a seeded random subset of items with at least that much audio.
    seconds = [len(a["array"]) / SR for a in data["audio"]]
    part = labels.fit_centroids(data, teacher, DEFAULT, fit_hours=3.0 / 3600, **fit_kwargs)
    assert 1 <= part.provenance["items_used"] < len(data)
    assert 3.0 - max(seconds) <= part.provenance["audio_seconds_used"] <= 3.0 + max(seconds)


def test_fit_sample_is_uniform_and_mergeable():
    rng = np.random.default_rng(0)
    keys = rng.random(20000)
    features = np.arange(20000, dtype=np.float32)[:, None].repeat(3, axis=1)
    one = labels.FrameReservoir(500, 3)
    for start in range(0, 20000, 777):
        one.add(keys[start : start + 777], features[start : start + 777])
    smallest = np.sort(np.argsort(keys)[:500])
    assert one.seen == 20000 and len(one) == 500
    np.testing.assert_array_equal(np.sort(one.sample()[:, 0].astype(int)), smallest)
    # Two halves (as two processes would hold them) merge into the same sample.
    left, right = labels.FrameReservoir(500, 3), labels.FrameReservoir(500, 3)
    left.add(keys[::2], features[::2])
    right.add(keys[1::2], torch.from_numpy(features[1::2]))
    left.add(right.keys, right.sample())
    np.testing.assert_array_equal(np.sort(left.sample()[:, 0].astype(int)), smallest)
    left.sort_by_key()
    one.sort_by_key()
    np.testing.assert_array_equal(left.sample(), one.sample())
    assert np.all(np.diff(one.keys) >= 0)


def test_cluster_diagnostics_values():
    ids = [[0, 0, 1, 1], [1, 1, 1, 1], [2, 2, 0, 2], None]
    speakers = ["a", "b", "c", "d"]
    report = labels.cluster_diagnostics(ids, 4, speakers, dominant_factor=1.5)
    assert report["counts"] == [3, 6, 3, 0] and report["dead_clusters"] == [3]
    assert report["skipped_items"] == 1 and report["frames"] == 12
    assert [d["cluster"] for d in report["dominant_clusters"]] == [1]
    p = np.array([3, 6, 3]) / 12
    assert report["entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    frame_speakers = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    frame_clusters = [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 0, 2]
    assert report["speaker"]["nmi"] == pytest.approx(
        normalized_mutual_info_score(frame_speakers, frame_clusters)
    )
    assert report["speaker"]["purity"] == pytest.approx((2 + 4 + 3) / 12)  # cluster-wise majority speaker
    spread = {s["speaker"]: s for s in report["speaker"]["per_speaker"]}
    assert spread["b"]["clusters_used"] == 1 and spread["a"]["perplexity"] == pytest.approx(2.0)
    uniform = labels.cluster_diagnostics([list(range(8))] * 3, 8)
    assert uniform["perplexity"] == pytest.approx(8.0) and not uniform["dominant_clusters"]


# ---------------------------------------------------------------------------------------------
# Two processes give the same result as one (fit and map), through the CLI
# ---------------------------------------------------------------------------------------------


def write_audiofolder(root: str, num_items: int = 10) -> None:
    rng = np.random.default_rng(7)
    os.makedirs(root)
    rows = ["file_name,speaker_id,split"]
    for i in range(num_items):
        name = f"u{i:02d}.flac"
        sf.write(os.path.join(root, name), voice(rng.uniform(0.4, 1.2), [120, 210, 300][i % 3], rng), SR)
        rows.append(f"{name},s{i % 3},train")
    with open(os.path.join(root, "metadata.csv"), "w") as handle:
        handle.write("\n".join(rows) + "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    data = str(tmp_path / "corpus")
    write_audiofolder(data)
    common = ["--data", data, "--split", "train", "--features", "mfcc", "--k", "6", "--n_init", "2"]
    common += ["--chunk_size", "3", "--max_frames", "400", "--kmeans_batch_size", "256", "--device", "cpu"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    # accelerate's torchrun-based launcher; `--cpu --num_processes 2` would need MPI for a second process.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(free_port()), os.path.join(REPO, "training", "prepare_labels.py")]
    command += common + ["--output", str(tmp_path / "two"), "--cache_dir", str(tmp_path / "cache2")]
    command += ["--report", str(tmp_path / "two" / "report")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    sys.path.insert(0, os.path.join(REPO, "training"))
    try:
        import prepare_labels
    finally:
        sys.path.pop(0)
    assert (
        prepare_labels.main(
            common + ["--output", str(tmp_path / "one"), "--cache_dir", str(tmp_path / "cache1")]
        )
        == 0
    )

    two = labels.Centroids.load(tmp_path / "two" / "centroids.safetensors")
    one = labels.Centroids.load(tmp_path / "one" / "centroids.safetensors")
    assert two.provenance["frames_used"] == one.provenance["frames_used"] == 400
    assert two.provenance["frames_seen"] == one.provenance["frames_seen"]
    torch.testing.assert_close(two.centroids, one.centroids)
    labelled_two = datasets.load_from_disk(str(tmp_path / "two" / "dataset")).with_format(None)
    labelled_one = datasets.load_from_disk(str(tmp_path / "one" / "dataset")).with_format(None)
    assert labelled_two["file_name"] == labelled_one["file_name"]
    assert labelled_two["cluster_ids"] == labelled_one["cluster_ids"]
    assert all(ids is not None for ids in labelled_one["cluster_ids"])
    config = DeluluConfig.from_json_file(str(tmp_path / "one" / "model_config.json"))
    assert (config.num_clusters, config.label_feature_dim, config.label_teacher_name) == (6, 39, "mfcc")
    assert os.path.isfile(tmp_path / "two" / "report" / "occupancy.png")
    # Both processes did part of the work: one committed shard (item block) per process, merged.
    shard_dir = tmp_path / "two" / "work" / "shards"
    blocks = [labels.read_shard(shard_dir / f, metadata_only=True) for f in sorted(os.listdir(shard_dir))]
    assert [[b["begin"], b["end"]] for b in blocks] == [["0", "6"], ["6", "10"]]
    assert sorted(b["rank"] for b in blocks) == ["0", "1"]
    assert (two.provenance["processes"], one.provenance["processes"]) == (2, 1)
    assert not os.path.exists(tmp_path / "two" / ".fit")


def test_cli_reuses_centroids_and_rejects_mismatch(tmp_path, mfcc_centroids):
    sys.path.insert(0, os.path.join(REPO, "training"))
    try:
        import prepare_labels
    finally:
        sys.path.pop(0)
    path = mfcc_centroids.save(tmp_path / "km.safetensors")
    config_path = str(tmp_path / "config.json")
    small_config(16).to_json_file(config_path)
    args = ["--data", "unused", "--features", "mfcc", "--centroids", path, "--output", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="num_clusters=16"):
        prepare_labels.main(args + ["--model_config", config_path])
    with pytest.raises(ValueError, match="'nearest'-aligned features, not 'mean'"):
        prepare_labels.main(args + ["--alignment", "mean"])
    # Without a model config, reusing the centroids needs no other flags.
    data = str(tmp_path / "corpus")
    write_audiofolder(data, num_items=3)
    args[1] = data
    assert prepare_labels.main(args + ["--split", "train", "--cache_dir", str(tmp_path / "cache")]) == 0
    labelled = datasets.load_from_disk(str(tmp_path / "out" / "dataset")).with_format(None)
    assert len(labelled) == 3 and all(ids and max(ids) < 8 for ids in labelled["cluster_ids"])
    torch.testing.assert_close(labels.Centroids.load(tmp_path / "out").centroids, mfcc_centroids.centroids)


def test_cli_window_embedding_labels_and_reuse(tmp_path):
    """``--teacher_output window-embedding`` clusters the head's windowed embeddings; the centroids
    record it, a reuse without flags picks it up again, and backbone features are refused."""
    from delulu_hf.teacher.redimnet import ReDimNet, ReDimNetConfig

    sys.path.insert(0, os.path.join(REPO, "training"))
    try:
        import prepare_labels
    finally:
        sys.path.pop(0)
    stages = [(1, 1, 2, [(3, 3)], 4), (2, 1, 1, [(3, 3)], None)]
    teacher_dir = str(tmp_path / "teacher")
    ReDimNet(ReDimNetConfig(F=12, C=4, group_divisor=1, embed_dim=16, stages_setup=stages)).save_pretrained(
        teacher_dir
    )
    data = str(tmp_path / "corpus")
    write_audiofolder(data, num_items=4)
    common = [
        "--data",
        data,
        "--split",
        "train",
        "--teacher",
        teacher_dir,
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    fit = common + ["--k", "3", "--n_init", "1", "--output", str(tmp_path / "fit")]
    assert prepare_labels.main(fit + ["--teacher_output", "window-embedding", "--window_seconds", "0.5"]) == 0
    centroids = labels.Centroids.load(tmp_path / "fit")
    teacher_info = centroids.provenance["teacher"]
    assert centroids.dim == 16 and teacher_info["name"].endswith(":window-51")
    assert teacher_info["output"] == {
        "output": "window-embedding",
        "window_seconds": 0.5,
        "window_frames": 51,
    }
    config = json.load(open(tmp_path / "fit" / "model_config.json"))
    assert config["label_feature_dim"] == 16 and config["label_teacher_name"] == teacher_info["name"]

    reuse = common + ["--centroids", str(tmp_path / "fit" / "centroids.safetensors")]
    # the same ids when items are decoded as the teacher needs them (no decoded cache)
    assert (
        prepare_labels.main(reuse + ["--output", str(tmp_path / "again"), "--audio_decoding", "on-the-fly"])
        == 0
    )

    def ids(folder: str) -> list:
        return list(
            datasets.load_from_disk(str(tmp_path / folder / "dataset")).with_format(None)["cluster_ids"]
        )

    assert ids("again") == ids("fit") and len(ids("fit")) == 4
    with pytest.raises(ValueError, match="fitted on .*window-51"):
        prepare_labels.main(reuse + ["--teacher_output", "backbone", "--output", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="needs a ReDimNet teacher"):
        labels.load_featurizer("mfcc", output="window-embedding")


def test_cli_old_hyphenated_spellings_still_work_and_warn(capsys):
    sys.path.insert(0, os.path.join(REPO, "training"))
    try:
        import prepare_labels
    finally:
        sys.path.pop(0)
    required = ["--data", "corpus", "--teacher", "t", "--output", "out"]
    old = prepare_labels.parse_args(required + ["--teacher-output", "window-embedding", "--no-bf16"])
    new = prepare_labels.parse_args(required + ["--teacher_output", "window-embedding", "--no_bf16"])
    assert old == new and old.teacher_output == "window-embedding" and old.bf16 is False
    err = capsys.readouterr().err
    assert "--teacher-output is deprecated, use --teacher_output" in err
    assert "--no-bf16 is deprecated, use --no_bf16" in err
    # The checks of the old command line are kept: choices, and a teacher unless --features mfcc.
    with pytest.raises(SystemExit) as exit_info:
        prepare_labels.parse_args(required + ["--teacher_output", "pooled"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_labels.parse_args(["--data", "corpus", "--output", "out"])
    assert "--teacher is required (or --features mfcc)" in capsys.readouterr().err


def test_cli_unknown_flag_exits_2_naming_the_closest_flag(tmp_path):
    command = [sys.executable, os.path.join(REPO, "training", "prepare_labels.py"), "--data", "corpus"]
    command += ["--features", "mfcc", "--output", str(tmp_path / "out"), "--window_secnods", "0.5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "prepare_labels.py: error: unknown option --window_secnods (did you mean --window_seconds?) (see --help)"
    ]
    assert not os.path.exists(tmp_path / "out")


def test_compare_label_features_scores_speaker_and_content_features():
    """A featurizer that sees only the speaker (constant level per speaker) gives pure clusters; one
    that sees only content (the level changes within every item, the same way for all speakers)
    gives clusters that say nothing about the speaker."""
    rng = np.random.default_rng(0)
    rows, speakers = [], []
    for item in range(12):
        speaker = item % 3
        n = int(rng.integers(8000, 16000))
        speaker_level = np.full(n, float(speaker), dtype=np.float32)
        content_level = np.repeat(np.arange(3, dtype=np.float32), -(-n // 3))[:n]  # 0,1,2 thirds
        rows.append({"speaker": speaker_level, "content": content_level})
        speakers.append(f"s{speaker}")

    def dataset(kind):
        audio = [{"array": r[kind], "sampling_rate": SR} for r in rows]
        return datasets.Dataset.from_dict({"audio": audio, "speaker_id": speakers})

    fit = dict(k=3, n_init=1, max_frames=5000, speaker_column="speaker_id", progress=False)
    config = small_config(3)
    speaker = labels.compare_label_features(
        dataset("speaker"), {"speaker": ChangePointTeacher(3)}, config, **fit
    )
    content = labels.compare_label_features(
        dataset("content"), {"content": ChangePointTeacher(3)}, config, **fit
    )
    assert speaker["speaker"]["speaker"]["purity"] == pytest.approx(1.0)
    assert speaker["speaker"]["speaker"]["nmi"] == pytest.approx(1.0)
    assert content["content"]["speaker"]["nmi"] < 0.01
    assert speaker["speaker"]["teacher"] == "change-points" and speaker["speaker"]["feature_dim"] == 3
    assert "counts" not in speaker["speaker"] and "per_speaker" not in speaker["speaker"]["speaker"]
    with pytest.raises(ValueError, match="no 'gender' column"):
        labels.compare_label_features(dataset("speaker"), {}, config, speaker_column="gender")


def test_compare_label_features_cli(tmp_path):
    from delulu_hf.teacher.redimnet import ReDimNet, ReDimNetConfig

    sys.path.insert(0, os.path.join(REPO, "training"))
    try:
        import compare_label_features
    finally:
        sys.path.pop(0)
    teacher = str(tmp_path / "teacher")
    stages = [(1, 1, 2, [(3, 3)], 4), (2, 1, 1, [(3, 3)], None)]
    config = ReDimNetConfig(F=12, C=4, group_divisor=1, embed_dim=16, stages_setup=stages)
    ReDimNet(config).save_pretrained(teacher)
    data = str(tmp_path / "corpus")
    write_audiofolder(data, num_items=6)
    out = tmp_path / "out"
    args = ["--data", data, "--teacher", teacher, "--windows", "0.2", "--k", "3", "--n_init", "1"]
    assert compare_label_features.main(args + ["--output", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["features"]) == ["redimnet backbone", "redimnet window 0.2 s", "mfcc"]
    assert saved["features"]["redimnet window 0.2 s"]["feature_dim"] == 16
    assert all(0.0 <= f["speaker"]["nmi"] <= 1.0 for f in saved["features"].values())
    assert "| mfcc | 39 | 3 |" in (out / "results.md").read_text()
    assert (out / "label_features.png").stat().st_size > 1000
