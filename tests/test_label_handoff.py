"""The labelled-corpus folder ``prepare_labels.py --output OUT`` hands to ``pretrain.py --dataset OUT``
(issue 14): the ``labels.json`` manifest and ``LabelledCorpus``, one list of skipped items everywhere,
the last printed line, and the command line's one-line user errors.

Generated FLAC files and MFCC features: every test runs in a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import datasets
import numpy as np
import pytest
import soundfile as sf

from delulu_hf import labels
from delulu_hf.configuration_delulu import DeluluConfig
from delulu_hf.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000


def write_corpus(root: str, num_items: int = 6, bad: bool = True) -> None:
    """An audiofolder; with ``bad``, ``broken.flac`` (not audio) and ``tiny.flac`` (shorter than the
    encoder's receptive field) among the good items."""
    rng = np.random.default_rng(3)
    os.makedirs(root)
    rows = ["file_name,speaker_id"]
    for i in range(num_items):
        t = np.arange(int(rng.uniform(0.4, 0.9) * SR)) / SR
        wave = 0.1 * np.sin(2 * np.pi * [130, 220, 310][i % 3] * t) + 0.01 * rng.standard_normal(len(t))
        sf.write(os.path.join(root, f"u{i:02d}.flac"), wave.astype(np.float32), SR)
        rows.append(f"u{i:02d}.flac,s{i % 3}")
    if bad:
        with open(os.path.join(root, "broken.flac"), "wb") as handle:
            handle.write(b"this is not audio at all")
        sf.write(os.path.join(root, "tiny.flac"), np.zeros(200, dtype=np.float32), SR)
        rows[3:3] = ["broken.flac,s0", "tiny.flac,s1"]
    with open(os.path.join(root, "metadata.csv"), "w") as handle:
        handle.write("\n".join(rows) + "\n")


def prepare_labels_module():
    sys.path.insert(0, os.path.join(REPO, "training"))
    try:
        import prepare_labels
    finally:
        sys.path.pop(0)
    return prepare_labels


def base_args(data: str, output: str, cache: str, *extra: str) -> list[str]:
    args = ["--data", data, "--features", "mfcc", "--k", "4", "--n_init", "1", "--max_frames", "300"]
    args += ["--kmeans_batch_size", "256", "--chunk_size", "3", "--device", "cpu"]
    return args + ["--output", output, "--cache_dir", cache, *extra]


@pytest.mark.parametrize("decoding,stage", [("cache", "decode"), ("on-the-fly", "label")])
def test_folder_manifest_and_one_list_of_skipped_items(tmp_path, capsys, caplog, decoding, stage):
    """Decoded into the cache, bad items are dropped before labelling; decoded on the fly, they stay
    in the dataset without ids. Either way the log, report.json, labels.json and the centroids'
    provenance list the same two items with their reasons."""
    prepare_labels = prepare_labels_module()
    data, out = str(tmp_path / "corpus"), str(tmp_path / "out")
    write_corpus(data)
    caplog.set_level(logging.INFO)
    args = base_args(data, out, str(tmp_path / "cache"), "--on_error", "skip", "--audio_decoding", decoding)
    assert prepare_labels.main(args + ["--report", os.path.join(out, "report")]) == 0

    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (
        f"labelled corpus: {out} (6 items labelled, 2 skipped); "
        f"pretrain with: accelerate launch training/pretrain.py --dataset {out}"
    )
    assert "2 skipped" in caplog.text

    corpus = labels.LabelledCorpus.load(out)
    manifest = corpus.manifest
    assert labels.is_labelled_corpus(out)
    assert manifest["format"] == "delulu-labelled-corpus" and manifest["format_version"] == 1
    assert (manifest["dataset"], manifest["centroids"]) == ("dataset", "centroids.safetensors")
    assert manifest["items"] == {"total": 8, "labelled": 6, "skipped": 2}
    skipped = {s["name"]: s for s in manifest["skipped"]}
    assert sorted(skipped) == ["broken.flac", "tiny.flac"]
    assert (
        "cannot decode" in skipped["broken.flac"]["reason"] and "too short" in skipped["tiny.flac"]["reason"]
    )
    assert {s["stage"] for s in manifest["skipped"]} == {stage}
    assert (
        manifest["source"]["data"] == os.path.abspath(data) and manifest["source"]["audio_column"] == "audio"
    )
    assert manifest["teacher"]["name"] == manifest["label_teacher_name"] == "mfcc"
    assert manifest["fit"]["items_used"] == 6 and manifest["fit"]["seed"] == 0
    assert (manifest["num_clusters"], manifest["label_feature_dim"]) == (4, 39)
    assert (manifest["label_frame_alignment"], manifest["normalization"]) == ("nearest", "none")

    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["skipped_count"] == 2 and "skipped_at_decode" not in report
    assert sorted(s["name"] for s in report["skipped"]) == ["broken.flac", "tiny.flac"]
    assert all(s["reason"] for s in report["skipped"])
    if stage == "decode":  # dropped before the fit: the centroids' provenance says so too
        provenance = json.loads((tmp_path / "out" / "centroids.json").read_text())
        assert sorted(s["name"] for s in provenance["skipped"]) == ["broken.flac", "tiny.flac"]

    # The API pretraining uses.
    assert corpus.dataset_path == os.path.join(out, "dataset")
    assert corpus.centroids_path == os.path.join(out, "centroids.safetensors")
    assert corpus.load_centroids().k == 4
    config = DeluluConfig.from_json_file(os.path.join(out, "model_config.json"))
    assert corpus.model_config_fields() == {
        "num_clusters": config.num_clusters,
        "label_teacher_name": config.label_teacher_name,
        "label_feature_dim": config.label_feature_dim,
        "label_frame_alignment": config.label_frame_alignment,
    }
    dataset = datasets.load_from_disk(corpus.dataset_path).with_format(None)
    assert len(dataset) == (6 if stage == "decode" else 8)
    assert sum(ids is None for ids in dataset["cluster_ids"]) == (0 if stage == "decode" else 2)
    if decoding == "on-the-fly":
        # The files are named by path, not copied into OUT/dataset (save_to_disk would embed them) ...
        audio_bytes = sum(
            os.path.getsize(os.path.join(data, f)) for f in os.listdir(data) if f.endswith(".flac")
        )
        stored = sum(
            os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(corpus.dataset_path) for f in fs
        )
        assert stored < audio_bytes / 4, (stored, audio_bytes)
        assert dataset[0]["audio"] == os.path.join(os.path.abspath(data), dataset[0]["file_name"])
        # ... and read back as undecoded audio by the one loader pretraining uses.
        from delulu_hf.audio import load_audio_dataset

        reread = load_audio_dataset(corpus.dataset_path, decode=False)
        assert isinstance(reread.features["audio"], datasets.Audio)
        assert reread[0]["audio"]["path"] == dataset[0]["audio"]
    # labels.json is written last.
    newest = max(
        os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(corpus.dataset_path) for f in fs
    )
    assert os.stat(os.path.join(out, labels.MANIFEST_NAME)).st_mtime_ns >= newest


def test_load_refuses_unfinished_and_corrupt_folders(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(UserError, match="not a labelled corpus"):
        labels.LabelledCorpus.load(folder)
    (folder / "work").mkdir()  # a label pass left its state here but no manifest: still running or killed
    with pytest.raises(UserError, match="has not finished.*rerun the same prepare_labels.py command"):
        labels.LabelledCorpus.load(folder)
    (folder / "labels.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt manifest"):
        labels.LabelledCorpus.load(folder)
    manifest = {"format": "delulu-labelled-corpus", "format_version": 1, "dataset": "dataset"}
    manifest.update(centroids="centroids.safetensors", num_clusters=4, items={}, skipped=[])
    labels.write_manifest(folder, manifest)
    assert labels.is_labelled_corpus(folder)
    with pytest.raises(UserError, match="dataset is missing or not a saved dataset"):
        labels.LabelledCorpus.load(folder)
    datasets.Dataset.from_dict({"cluster_ids": [[1, 2]]}).save_to_disk(str(folder / "dataset"))
    with pytest.raises(UserError, match="centroids.safetensors is missing"):
        labels.LabelledCorpus.load(folder)
    labels.write_manifest(folder, dict(manifest, format_version=2))
    with pytest.raises(UserError, match="newer than this delulu-hf reads"):
        labels.LabelledCorpus.load(folder)


def test_k_follows_the_model_config_and_a_disagreement_is_one_line(tmp_path, monkeypatch):
    prepare_labels = prepare_labels_module()
    data = str(tmp_path / "corpus")
    write_corpus(data, bad=False)
    config_path = str(tmp_path / "config.json")
    DeluluConfig(num_clusters=3, label_teacher_name=None, label_feature_dim=None).to_json_file(config_path)
    args = base_args(data, str(tmp_path / "out"), str(tmp_path / "cache"), "--model_config", config_path)
    without_k = args[: args.index("--k")] + args[args.index("--k") + 2 :]
    assert prepare_labels.main(without_k) == 0
    assert labels.LabelledCorpus.load(tmp_path / "out").manifest["num_clusters"] == 3

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before --k was checked")

    monkeypatch.setattr(labels, "load_featurizer", no_teacher)
    with pytest.raises(UserError) as error:
        prepare_labels.main(without_k + ["--k", "5", "--output", str(tmp_path / "other")])
    message = str(error.value)
    assert "\n" not in message and "--k 5" in message and "num_clusters=3" in message
    assert "drop --k" in message and not os.path.exists(tmp_path / "other")


def test_missing_data_fails_before_any_model_load_or_output(tmp_path, monkeypatch):
    prepare_labels = prepare_labels_module()

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before --data was checked")

    monkeypatch.setattr(labels, "load_featurizer", no_teacher)
    (tmp_path / "data").mkdir()
    for missing in (str(tmp_path / "nope"), os.path.join(str(tmp_path / "data"), "typo"), "./no_such_corpus"):
        out = tmp_path / "out"
        with pytest.raises(UserError, match=f"--data {missing}: no such file or folder"):
            prepare_labels.main(base_args(missing, str(out), str(tmp_path / "cache")))
        assert not out.exists()


@pytest.mark.parametrize("decoding", ["cache", "on-the-fly"])
def test_corrupt_file_under_raise_is_one_line_naming_it_and_the_way_out(tmp_path, decoding):
    prepare_labels = prepare_labels_module()
    data = str(tmp_path / "corpus")
    write_corpus(data)
    args = base_args(data, str(tmp_path / "out"), str(tmp_path / "cache"), "--audio_decoding", decoding)
    with pytest.raises(UserError) as error:
        prepare_labels.main(args)
    message = str(error.value)
    assert "\n" not in message and "broken.flac" in message and "cannot decode audio" in message
    assert "--on_error skip" in message
