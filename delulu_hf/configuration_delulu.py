"""DELULU model configuration.

This file is Hub remote code: it may import only from `transformers`, `huggingface_hub` and the
standard library, so that a saved folder loads with ``trust_remote_code=True`` where ``delulu_hf``
is not installed.
"""

import functools
import operator

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

LABEL_FRAME_ALIGNMENTS = ("nearest", "mean")
# What a distillation head regresses onto (the same names as the label pipeline's teacher outputs),
# with which loss, on which frames.
DISTILL_TARGETS = ("backbone", "window-embedding")
DISTILL_LOSSES = ("l1_cosine", "cosine", "l1", "mse")
DISTILL_FRAMES = ("all", "masked", "unmasked")


def feat_extract_output_lengths(config: "DeluluConfig", input_lengths):
    """Number of encoder frames for ``input_lengths`` samples (int or LongTensor in, same type out).

    The one definition of the frame count: the model, the label pipeline and the data path all
    call it. Each conv layer maps ``n`` to ``(n - kernel) // stride + 1``; inputs shorter than the
    receptive field give 0 frames (never a negative count). 1 s at 16 kHz gives 62 frames with the
    default stack.
    """
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        input_lengths = (input_lengths - kernel) // stride + 1
    if hasattr(input_lengths, "clamp"):  # a torch tensor (this file does not import torch)
        return input_lengths.clamp(min=0)
    return max(int(input_lengths), 0)


def receptive_field(config: "DeluluConfig") -> int:
    """Samples seen by one encoder frame: frame ``i`` covers ``[i * hop, i * hop + receptive_field)``.

    ``hop`` is ``config.inputs_to_logits_ratio`` (256); the default stack gives 322 samples, the
    shortest input that yields one frame.
    """
    field, jump = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        field += (kernel - 1) * jump
        jump *= stride
    return field


@strict
class DeluluConfig(PreTrainedConfig):
    r"""Configuration of a DELULU speech encoder (arXiv 2510.17662) and its heads.

    DELULU is a HuBERT-style encoder trained to predict k-means clusters of *speaker* features
    (frame-level ReDimNet embeddings) on masked frames, plus a denoising term. Field names follow
    [`HubertConfig`] / [`Wav2Vec2Config`] wherever the concept is the same; the defaults are
    DELULU Base: the HuBERT-Base transformer (768 / 12 layers / 12 heads / FFN 3072, post-LN) on a
    conv front end with total stride 256 samples (16 ms frames at 16 kHz instead of HuBERT's 20 ms).

    Encoder:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act:
            Transformer dimensions and FFN activation.
        hidden_dropout (default 0.1), activation_dropout (0.0), attention_dropout (0.1),
        feat_proj_dropout (0.1), layerdrop (0.05):
            fairseq HuBERT-Base values (`dropout`, `activation_dropout`, `attention_dropout`,
            `dropout_input`, `encoder_layerdrop`).
        initializer_range, layer_norm_eps: as in HuBERT.
        feat_extract_norm (`"layer"`):
            Layer norm over channels after every conv layer (as HuBERT-Large). This is the only
            accepted value: wav2vec2-base's `"group"` norm normalises over the (padded) time axis,
            so a padded item would not give the same outputs as its unpadded run.
        feat_extract_activation, conv_dim, conv_stride, conv_kernel, conv_bias:
            The conv front end. The default strides (4, 2, 2, 2, 2, 2, 2) multiply to 256 samples
            (16 ms); 1 s of 16 kHz audio gives 62 frames.
        feat_proj_layer_norm: layer norm on the conv features before the projection.
        num_conv_pos_embeddings, num_conv_pos_embedding_groups: convolutional position embedding.
        do_stable_layer_norm: pre-LN transformer layers (HuBERT-Large) instead of post-LN (Base).

    Masking (HuBERT-Base: `mask_prob` 0.8, span 10):
        apply_spec_augment, mask_time_prob, mask_time_length, mask_time_min_masks,
        mask_feature_prob, mask_feature_length, mask_feature_min_masks: as in `HubertConfig`.

    Masked-cluster prediction ([`DeluluForPreTraining`]):
        num_clusters (256): k of the k-means targets.
        final_dim (256): size of the projection and of the cluster embeddings the logits compare.
        logit_temperature (0.1): logits are cosine(proj(h_t), e_c) / logit_temperature.

    Denoising (the collator corrupts inputs; labels stay those of the clean primary utterance):
        denoise_loss_weight (lambda, default 0.1):
            Weight of the denoising term: cross-entropy on the *unmasked* frames of corrupted
            items (the masked frames of corrupted items are already in the masked loss). Both
            terms are per-frame means, so lambda weighs the two objectives, not frame counts.
            0.1 because (i) predicting a visible frame is far easier than a masked one, and
            HuBERT found that weighting unmasked frames up hurts (its `pred_nomask_weight` is 0),
            so the masked objective must stay dominant; (ii) with the defaults below (20% of
            items corrupted, ~57% of frames masked at mask_time_prob 0.8) a denoising frame then
            gets ~0.7x the gradient weight of a masked frame: comparable, never dominant. The
            DELULU paper does not publish lambda. lambda = 0 turns the term off (loss ==
            masked_loss).
        denoise_corruption_prob (0.2): probability that the collator corrupts an item (the
            UniSpeech-SAT / WavLM mixing rate).
        denoise_utterance_mix_prob (0.5): given a corrupted item, probability that the interferer
            is a crop of another utterance rather than noise.
        denoise_snr_min_db, denoise_snr_max_db (15, 25): the primary-to-interferer SNR is drawn
            uniformly from this range (DELULU's published range); it applies to noise and to
            mixed utterances alike, so the primary speaker always dominates.
        denoise_mix_max_overlap (0.5): an interfering utterance covers at most this fraction of
            the primary's length (WavLM).

    Front-end stabilisers (fairseq HuBERT-Base sets ``feature_grad_mult: 0.1`` and
    ``loss_weights: [10,]``; both exist because Base-size raw-waveform pretraining is unstable
    without them. The defaults here are neutral, as in transformers' HuBERT, so fine-tuning is
    unaffected; ``training/configs/base_4xh100.yaml`` sets HuBERT's values):
        feature_grad_mult (1.0): the conv front end's gradient is scaled by this whenever the model
            trains (the forward pass is unchanged). 0.1 = HuBERT-Base.
        feature_penalty_weight (0.0): [`DeluluForPreTraining`] adds this times the mean squared
            conv feature (over real frames and channels) to the loss, reported as
            ``feature_penalty``. 10 = HuBERT's ``loss_weights``.

    Teacher distillation (the paper's first open question: can regression onto the teacher's frame
    features replace its k-means ids? DistilHuBERT's objective on a HuBERT-style student). Off by
    default (``distill_loss_weight`` 0: the paper's recipe). The teacher never enters the model: the
    training loop passes its features, aligned to the 16 ms frames, as ``teacher_targets``
    (``delulu_hf.pretraining.distill``); these fields record what was distilled so a checkpoint
    says which objective trained it:
        distill_loss_weight (0.0): weight of the regression term. With ``cluster_loss_weight`` 1
            both objectives train the encoder; with ``cluster_loss_weight`` 0 only the regression
            does (the model then needs no labels; the pretraining data path still reads a labelled
            corpus, whose ids only mark the real frames).
        cluster_loss_weight (1.0): weight of the masked + denoising cluster cross-entropy.
        distill_target ("window-embedding" | "backbone"): the teacher's embedding head over a
            ``distill_window_seconds`` window centred on each frame (a speaker embedding per frame;
            its k-means ids carry 8x the speaker NMI of backbone ids on the demo teacher), or the
            pre-pooling backbone frames the paper clusters.
        distill_dim (None): width of the targets (192 for the demo teacher's window embeddings);
            sizes ``distill_head``, a linear map from the last layer. ``training/pretrain.py`` sets it
            from the teacher when left unset; a model with ``distill_loss_weight > 0`` needs it.
        distill_loss ("cosine" | "l1_cosine" | "l1" | "mse"): per frame, ``1 - cos``;
            DistilHuBERT's ``L1 - log sigmoid(cos)``; or plain L1 / MSE. Cosine is the default
            because what is distilled is a speaker embedding, which verification compares by
            direction only; the magnitudes of standardised window embeddings carry no identity.
        distill_frames ("all" | "masked" | "unmasked"): frames the regression covers (real frames
            only). "all" is DistilHuBERT's; "masked" makes it masked prediction of teacher features.
        distill_standardize (True): targets are standardised per dimension with statistics
            measured on the training audio (stored with the run: ``distill_targets.json``).
        distill_teacher_name (None), distill_window_seconds (1.0): provenance of the targets.

    Label provenance (so a checkpoint says how its targets were made):
        label_teacher_name ("redimnet-b6"): the teacher whose frame features were clustered.
        label_feature_dim (2304): width of those features (ReDimNet B4-B6: 2304).
        label_frame_alignment ("nearest" | "mean"): how 10 ms teacher frames map to 16 ms encoder
            frames: the teacher frame nearest the encoder frame's centre, or the cluster of the
            mean teacher feature over the encoder frame's span.

    Heads:
        use_weighted_layer_sum, classifier_proj_size, tdnn_dim, tdnn_kernel, tdnn_dilation,
        xvector_output_dim: as in `Wav2Vec2Config` ([`DeluluForSequenceClassification`],
        [`DeluluForXVector`]).

    Example:

    ```python
    >>> from delulu_hf import DeluluConfig, DeluluModel
    >>> model = DeluluModel(DeluluConfig())
    ```
    """

    model_type = "delulu"

    # Encoder.
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float | int = 0.1
    activation_dropout: float | int = 0.0
    attention_dropout: float | int = 0.1
    feat_proj_dropout: float | int = 0.1
    layerdrop: float | int = 0.05
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "layer"
    feat_extract_activation: str = "gelu"
    feat_proj_layer_norm: bool = True
    conv_dim: list[int] | tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: list[int] | tuple[int, ...] = (4, 2, 2, 2, 2, 2, 2)
    conv_kernel: list[int] | tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False

    # Span masking.
    apply_spec_augment: bool = True
    mask_time_prob: float | int = 0.8
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float | int = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0

    # Masked-cluster prediction.
    num_clusters: int = 256
    final_dim: int = 256
    logit_temperature: float | int = 0.1

    # Denoising.
    denoise_loss_weight: float | int = 0.1
    denoise_corruption_prob: float | int = 0.2
    denoise_utterance_mix_prob: float | int = 0.5
    denoise_snr_min_db: float | int = 15.0
    denoise_snr_max_db: float | int = 25.0
    denoise_mix_max_overlap: float | int = 0.5

    # Front-end stabilisers.
    feature_grad_mult: float | int = 1.0
    feature_penalty_weight: float | int = 0.0

    # Teacher distillation.
    distill_loss_weight: float | int = 0.0
    cluster_loss_weight: float | int = 1.0
    distill_target: str = "window-embedding"
    distill_dim: int | None = None
    distill_loss: str = "cosine"
    distill_frames: str = "all"
    distill_standardize: bool = True
    distill_teacher_name: str | None = None
    distill_window_seconds: float | int = 1.0

    # Label provenance.
    label_teacher_name: str | None = "redimnet-b6"
    label_feature_dim: int | None = 2304
    label_frame_alignment: str = "nearest"

    # Downstream heads.
    use_weighted_layer_sum: bool = False
    classifier_proj_size: int = 256
    tdnn_dim: list[int] | tuple[int, ...] = (512, 512, 512, 512, 1500)
    tdnn_kernel: list[int] | tuple[int, ...] = (5, 3, 3, 1, 1)
    tdnn_dilation: list[int] | tuple[int, ...] = (1, 2, 3, 1, 1)
    xvector_output_dim: int = 512

    @property
    def num_feat_extract_layers(self) -> int:
        """Number of conv layers in the feature encoder."""
        return len(self.conv_dim)

    @property
    def inputs_to_logits_ratio(self) -> int:
        """Samples per encoder frame (256 for the default 16 ms stack); used by transformers pipelines."""
        return functools.reduce(operator.mul, self.conv_stride, 1)

    def validate_architecture(self) -> None:
        """Reject inconsistent dimensions at construction (run by `@strict` after `__init__`)."""
        if (
            self.hidden_size <= 0
            or self.num_attention_heads <= 0
            or self.hidden_size % self.num_attention_heads
        ):
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a positive multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        for name in ("num_hidden_layers", "intermediate_size", "final_dim", "classifier_proj_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.num_hidden_layers and self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_conv_pos_embedding_groups "
                f"({self.num_conv_pos_embedding_groups})."
            )
        if self.num_conv_pos_embeddings < 1:
            raise ValueError(f"num_conv_pos_embeddings must be >= 1, got {self.num_conv_pos_embeddings}.")
        lengths = {"conv_dim": len(self.conv_dim), "conv_stride": len(self.conv_stride)}
        lengths["conv_kernel"] = len(self.conv_kernel)
        if len(set(lengths.values())) != 1 or lengths["conv_dim"] == 0:
            raise ValueError(
                "conv_dim, conv_stride and conv_kernel must be non-empty and of equal length (one entry per "
                f"conv layer), got lengths {lengths}."
            )
        for name in ("conv_dim", "conv_stride", "conv_kernel"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} entries must be >= 1, got {tuple(getattr(self, name))}.")
        tdnn = {"tdnn_dim": len(self.tdnn_dim), "tdnn_kernel": len(self.tdnn_kernel)}
        tdnn["tdnn_dilation"] = len(self.tdnn_dilation)
        if len(set(tdnn.values())) != 1 or tdnn["tdnn_dim"] == 0:
            raise ValueError(f"tdnn_dim, tdnn_kernel and tdnn_dilation must have equal lengths, got {tdnn}.")
        if self.feat_extract_norm != "layer":
            raise ValueError(
                f"feat_extract_norm must be 'layer', got {self.feat_extract_norm!r}: a 'group' norm over the "
                "padded time axis (wav2vec2-base) would make outputs depend on padding."
            )

    def validate_training(self) -> None:
        """Reject out-of-range probabilities, weights and label settings."""
        for name in (
            "hidden_dropout",
            "activation_dropout",
            "attention_dropout",
            "feat_proj_dropout",
            "layerdrop",
            "mask_time_prob",
            "mask_feature_prob",
            "denoise_corruption_prob",
            "denoise_utterance_mix_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if not 0.0 < self.denoise_mix_max_overlap <= 1.0:
            raise ValueError(
                f"denoise_mix_max_overlap must be in (0, 1], got {self.denoise_mix_max_overlap}."
            )
        if self.mask_time_length < 1 or self.mask_feature_length < 1:
            raise ValueError(
                f"mask_time_length ({self.mask_time_length}) and mask_feature_length "
                f"({self.mask_feature_length}) must be >= 1."
            )
        if self.mask_time_min_masks < 0 or self.mask_feature_min_masks < 0:
            raise ValueError("mask_time_min_masks and mask_feature_min_masks must be >= 0.")
        if self.num_clusters < 2:
            raise ValueError(f"num_clusters (k-means k) must be >= 2, got {self.num_clusters}.")
        if self.logit_temperature <= 0:
            raise ValueError(f"logit_temperature must be > 0, got {self.logit_temperature}.")
        if self.feature_grad_mult < 0 or self.feature_penalty_weight < 0:
            raise ValueError(
                f"feature_grad_mult ({self.feature_grad_mult}) and feature_penalty_weight "
                f"({self.feature_penalty_weight}) must be >= 0."
            )
        if self.distill_loss_weight < 0 or self.cluster_loss_weight < 0:
            raise ValueError(
                f"distill_loss_weight ({self.distill_loss_weight}) and cluster_loss_weight "
                f"({self.cluster_loss_weight}) must be >= 0."
            )
        for name, allowed in (
            ("distill_target", DISTILL_TARGETS),
            ("distill_loss", DISTILL_LOSSES),
            ("distill_frames", DISTILL_FRAMES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.distill_dim is not None and self.distill_dim < 1:
            raise ValueError(f"distill_dim must be >= 1 or None, got {self.distill_dim}.")
        if self.distill_window_seconds <= 0:
            raise ValueError(f"distill_window_seconds must be > 0, got {self.distill_window_seconds}.")
        if self.denoise_loss_weight < 0:
            raise ValueError(f"denoise_loss_weight (lambda) must be >= 0, got {self.denoise_loss_weight}.")
        if self.denoise_snr_min_db > self.denoise_snr_max_db:
            raise ValueError(
                f"denoise_snr_min_db ({self.denoise_snr_min_db}) must be <= denoise_snr_max_db "
                f"({self.denoise_snr_max_db})."
            )
        if self.label_frame_alignment not in LABEL_FRAME_ALIGNMENTS:
            raise ValueError(
                f"label_frame_alignment must be one of {LABEL_FRAME_ALIGNMENTS}, got {self.label_frame_alignment!r}."
            )
        if self.label_feature_dim is not None and self.label_feature_dim < 1:
            raise ValueError(f"label_feature_dim must be >= 1 or None, got {self.label_feature_dim}.")


DeluluConfig.register_for_auto_class()

__all__ = [
    "DISTILL_FRAMES",
    "DISTILL_LOSSES",
    "DISTILL_TARGETS",
    "DeluluConfig",
    "feat_extract_output_lengths",
    "receptive_field",
]
