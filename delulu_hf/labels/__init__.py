"""Cluster ids for DELULU pretraining: audio + a teacher in, k-means centroids and a ``cluster_ids`` column out.

DELULU's targets are k-means clusters of a speaker model's frame-level features (ReDimNet, 10 ms
frames), predicted by an encoder with 16 ms frames. One small module per step, in the order data
flows through them (each imports only from the ones above it):

* ``features``: the featurizers (ReDimNet via ``load_featurizer``, HuBERT's ``MFCCFeatures``
  control) and ``featurizer_provenance`` (what identifies one in files and caches).
* ``alignment``: ``EncoderFrames`` (the encoder geometry, counted by ``configuration_delulu``'s
  frame arithmetic) and ``alignment_index`` (which 10 ms teacher frames feed each 16 ms frame).
* ``extract``: the front half fit and map share: decode a dataset batch, run the teacher in
  length-sorted batches, align (``AlignedFeatureExtractor``, ``LabelBatch``, ``LabelSkip``).
* ``centroids``: ``Centroids`` on disk (safetensors + JSON provenance, never pickle) and the
  checks against a model config and a teacher.
* ``store``: ``FitFeatureStore``, the fit items' aligned features kept on disk (a byte budget) so
  the map need not run the teacher on them again.
* ``kmeans``: ``fit_centroids`` (``FrameReservoir`` sample, ``MiniBatchKMeans`` with HuBERT's
  ``KMEANS_DEFAULTS``).
* ``assign``: ``ClusterAssigner``, a torch argmin equal to ``MiniBatchKMeans.predict``.
* ``map``: ``add_cluster_ids``, the cached (and multi-process) ``datasets.map``; ``skipped_items``.
* ``diagnostics``: occupancy, speaker purity/NMI, alignment plot, ``write_report`` and
  ``compare_label_features``.
* ``handoff``: the labelled-corpus folder's manifest (``labels.json``) and ``LabelledCorpus``, the
  reader ``pretrain.py --dataset OUT`` uses.
* ``shards``: ``ShardPlan`` and the sharded map, one committed file of ids per shard.
* ``corpus``: ``LabelPass``, the resumable pass into one folder: fit (or reuse) -> shards ->
  assembled dataset -> manifest.

``training/prepare_labels.py`` runs that pass (and the report) from the command line.
"""

from delulu_hf.atomic import atomic_save_dataset
from delulu_hf.labels.alignment import ALIGNMENTS, Alignment, EncoderFrames, alignment_index
from delulu_hf.labels.assign import ClusterAssigner
from delulu_hf.labels.centroids import (
    CENTROIDS_FORMAT,
    CENTROIDS_FORMAT_VERSION,
    Centroids,
    label_config_problems,
)
from delulu_hf.labels.corpus import (
    DEFAULT_FIT_FEATURE_BUDGET_GB,
    LabelPass,
    corpus_manifest,
    input_differences,
)
from delulu_hf.labels.diagnostics import (
    cluster_diagnostics,
    compare_label_features,
    plot_alignment,
    plot_occupancy,
    write_report,
)
from delulu_hf.labels.extract import (
    LABEL_COLUMN,
    LABELS_VERSION,
    NORMALIZATIONS,
    ON_ERROR,
    AlignedFeatureExtractor,
    LabelSkip,
    Normalization,
    OnError,
)
from delulu_hf.labels.features import (
    TEACHER_OUTPUTS,
    MFCCFeatures,
    TeacherOutput,
    featurizer_provenance,
    load_featurizer,
)
from delulu_hf.labels.handoff import (
    MANIFEST_NAME,
    LabelledCorpus,
    is_labelled_corpus,
    write_manifest,
)
from delulu_hf.labels.kmeans import KMEANS_DEFAULTS, FrameReservoir, fit_centroids
from delulu_hf.labels.map import add_cluster_ids, skipped_items
from delulu_hf.labels.shards import DEFAULT_SHARD_HOURS, ShardPlan, read_shard
from delulu_hf.labels.store import FitFeatureStore

__all__ = [
    "ALIGNMENTS",
    "DEFAULT_FIT_FEATURE_BUDGET_GB",
    "DEFAULT_SHARD_HOURS",
    "CENTROIDS_FORMAT",
    "CENTROIDS_FORMAT_VERSION",
    "KMEANS_DEFAULTS",
    "LABELS_VERSION",
    "LABEL_COLUMN",
    "MANIFEST_NAME",
    "NORMALIZATIONS",
    "ON_ERROR",
    "TEACHER_OUTPUTS",
    "AlignedFeatureExtractor",
    "Alignment",
    "Centroids",
    "ClusterAssigner",
    "EncoderFrames",
    "FitFeatureStore",
    "FrameReservoir",
    "LabelPass",
    "LabelSkip",
    "LabelledCorpus",
    "MFCCFeatures",
    "Normalization",
    "ShardPlan",
    "OnError",
    "TeacherOutput",
    "add_cluster_ids",
    "alignment_index",
    "atomic_save_dataset",
    "cluster_diagnostics",
    "compare_label_features",
    "corpus_manifest",
    "featurizer_provenance",
    "fit_centroids",
    "input_differences",
    "is_labelled_corpus",
    "label_config_problems",
    "load_featurizer",
    "plot_alignment",
    "plot_occupancy",
    "read_shard",
    "skipped_items",
    "write_manifest",
    "write_report",
]
