"""PyTorch DELULU model: a speaker-aware HuBERT-style speech encoder (arXiv 2510.17662).

The file reads in data order: frame helpers -> conv feature encoder -> feature projection ->
attention -> feed-forward -> encoder layer -> encoder -> pretrained-model base -> base model ->
heads. It is Hub remote code: apart from `transformers`/`torch` it imports only the config, via a
single-dot relative import, so a saved folder loads with ``trust_remote_code=True`` anywhere.

Speed notes (measured on CPU with ``benchmarks/bench_model.py`` and the torch profiler): the conv
front end keeps activations channels-last ``(batch, time, channels)``, so the per-layer layer norm
and GELU run on contiguous tensors with no transpose copies; the first layer (one input channel)
is a matmul over strided windows; in bf16/fp16 the other convolutions use NHWC kernels on free
views of the channels-last activations.
"""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2FeatureExtractor
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.feature_extraction_utils import FEATURE_EXTRACTOR_NAME
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    ModelOutput,
    SequenceClassifierOutput,
    XVectorOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    AMSoftmaxLoss,
    TDNNLayer,
    Wav2Vec2BaseModelOutput,
    Wav2Vec2PreTrainedModel,
    _compute_mask_indices,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

# Frame arithmetic lives beside the config, so the label pipeline (which runs before any model
# exists) counts frames with exactly the model's formula.
from .configuration_delulu import DeluluConfig, feat_extract_output_lengths, receptive_field

# Auto class -> class name, written into every saved config so a folder saved from any DELULU class
# loads with all of them (transformers only records the class that was saved).
DELULU_AUTO_MAP = {
    "AutoConfig": "configuration_delulu.DeluluConfig",
    "AutoModel": "modeling_delulu.DeluluModel",
    "AutoModelForPreTraining": "modeling_delulu.DeluluForPreTraining",
    "AutoModelForAudioXVector": "modeling_delulu.DeluluForXVector",
    "AutoModelForAudioClassification": "modeling_delulu.DeluluForSequenceClassification",
}


def default_feature_extractor(config: DeluluConfig | None = None, **overrides) -> Wav2Vec2FeatureExtractor:
    """The `Wav2Vec2FeatureExtractor` DELULU checkpoints are saved with.

    16 kHz mono, per-utterance zero-mean/unit-variance normalisation, and ``return_attention_mask=True``:
    the layer-norm front end is padding-invariant, so padded batches must pass their attention mask.
    """
    kwargs = {
        "feature_size": 1,
        "sampling_rate": 16000,
        "padding_value": 0.0,
        "do_normalize": True,
        "return_attention_mask": True,
    }
    kwargs.update(overrides)
    return Wav2Vec2FeatureExtractor(**kwargs)


# ----------------------------------------------------------------------------------------------
# Conv feature encoder (channels-last throughout)
# ----------------------------------------------------------------------------------------------


def _low_precision(tensor: torch.Tensor) -> bool:
    """Whether convolutions on ``tensor`` run in bf16/fp16 (its dtype, or an active autocast)."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type) in (torch.bfloat16, torch.float16)
    return tensor.dtype in (torch.bfloat16, torch.float16)


class DeluluConvLayer(GradientCheckpointingLayer):
    """Conv1d -> layer norm over channels -> activation, on ``(batch, time, channels)`` tensors.

    The weights are a plain ``nn.Conv1d`` (so checkpoints match the usual wav2vec2 layout). The
    single-channel waveform layer is a matmul over strided windows, which is channels-last by
    construction. Later layers run in bf16/fp16 as an NHWC 2-D convolution on a free view of the
    channels-last input (no transpose copies); in float32 as a channels-first conv1d, whose kernels
    are faster there (measured on CPU).
    """

    def __init__(self, config: DeluluConfig, layer_id: int = 0):
        super().__init__()
        self.in_conv_dim = config.conv_dim[layer_id - 1] if layer_id > 0 else 1
        self.out_conv_dim = config.conv_dim[layer_id]
        self.conv = nn.Conv1d(
            self.in_conv_dim,
            self.out_conv_dim,
            kernel_size=config.conv_kernel[layer_id],
            stride=config.conv_stride[layer_id],
            bias=config.conv_bias,
        )
        self.layer_norm = nn.LayerNorm(self.out_conv_dim, eps=config.layer_norm_eps)
        self.activation = ACT2FN[config.feat_extract_activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(batch, time, in_channels)`` (or ``(batch, samples)`` for layer 0) -> ``(batch, frames, out_channels)``."""
        kernel, stride = self.conv.kernel_size[0], self.conv.stride[0]
        weight = self.conv.weight
        if self.in_conv_dim == 1:
            samples = hidden_states.reshape(hidden_states.shape[0], -1)
            windows = samples.unfold(-1, kernel, stride)  # (batch, frames, kernel), a strided view
            hidden_states = F.linear(windows, weight.view(self.out_conv_dim, kernel), self.conv.bias)
        elif _low_precision(hidden_states):
            # (B, T, C) viewed as an NHWC image (B, C, 1, T): no copy, and the output stays NHWC.
            image = hidden_states.transpose(1, 2).unsqueeze(2)
            hidden_states = F.conv2d(image, weight.unsqueeze(2), self.conv.bias, stride=(1, stride))
            hidden_states = hidden_states.squeeze(2).transpose(1, 2)
        else:
            # In float32, oneDNN's channels-first kernels are ~2x faster than NHWC (backward especially).
            channels_first = hidden_states.transpose(1, 2).contiguous()
            hidden_states = F.conv1d(channels_first, weight, self.conv.bias, stride=stride)
            hidden_states = hidden_states.transpose(1, 2)
        hidden_states = self.layer_norm(hidden_states)
        return self.activation(hidden_states)


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by ``scale`` backward (fairseq's ``feature_grad_mult``)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class DeluluFeatureEncoder(nn.Module):
    """Raw waveform ``(batch, samples)`` -> conv features ``(batch, frames, conv_dim[-1])``."""

    def __init__(self, config: DeluluConfig):
        super().__init__()
        self.conv_layers = nn.ModuleList(
            [DeluluConvLayer(config, i) for i in range(config.num_feat_extract_layers)]
        )
        self.gradient_checkpointing = False
        self._requires_grad = True

    def _freeze_parameters(self) -> None:
        for param in self.parameters():
            param.requires_grad = False
        self._requires_grad = False

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        hidden_states = input_values
        if self._requires_grad and self.training and self.conv_layers[0].gradient_checkpointing:
            # Reentrant checkpointing only backpropagates through a layer whose input requires grad; the
            # waveform never does, so without this the first conv layer would get no gradient.
            if not hidden_states.requires_grad:
                hidden_states = hidden_states.detach().requires_grad_(True)
        for conv_layer in self.conv_layers:
            hidden_states = conv_layer(hidden_states)
        return hidden_states


class DeluluFeatureProjection(nn.Module):
    """Layer norm + linear projection of the conv features to ``hidden_size``."""

    def __init__(self, config: DeluluConfig):
        super().__init__()
        self.feat_proj_layer_norm = config.feat_proj_layer_norm
        if self.feat_proj_layer_norm:
            self.layer_norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.conv_dim[-1], config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.feat_proj_layer_norm:
            hidden_states = self.layer_norm(hidden_states)
        return self.dropout(self.projection(hidden_states))


class DeluluPositionalConvEmbedding(nn.Module):
    """Grouped, weight-normalised convolution over time that gives the transformer relative position.

    Same semantics as HuBERT's (kernel ``num_conv_pos_embeddings``, "same" padding with the last
    output dropped for even kernels), computed channels-last.
    """

    def __init__(self, config: DeluluConfig):
        super().__init__()
        self.kernel_size = config.num_conv_pos_embeddings
        conv = nn.Conv1d(
            config.hidden_size,
            config.hidden_size,
            kernel_size=self.kernel_size,
            padding=0,
            groups=config.num_conv_pos_embedding_groups,
        )
        # Normalise over everything but the kernel axis, as fairseq's HuBERT does (dim=2).
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.activation = ACT2FN[config.feat_extract_activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(batch, frames, hidden)`` -> ``(batch, frames, hidden)``."""
        frames = hidden_states.shape[1]
        pad = self.kernel_size // 2
        if _low_precision(hidden_states):
            image = hidden_states.transpose(1, 2).unsqueeze(2)  # NHWC view, as in DeluluConvLayer
            out = F.conv2d(
                image,
                self.conv.weight.unsqueeze(2),
                self.conv.bias,
                padding=(0, pad),
                groups=self.conv.groups,
            )
            out = out.squeeze(2)
        else:
            out = F.conv1d(
                hidden_states.transpose(1, 2).contiguous(),
                self.conv.weight,
                self.conv.bias,
                padding=pad,
                groups=self.conv.groups,
            )
        return self.activation(out[:, :, :frames].transpose(1, 2))


# ----------------------------------------------------------------------------------------------
# Transformer encoder
# ----------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention that also returns the weights (used for ``output_attentions``)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class DeluluAttention(nn.Module):
    """Bidirectional multi-head self-attention dispatched through transformers' attention interface."""

    def __init__(self, config: DeluluConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = False
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.out_proj(attn_output.reshape(*input_shape, -1))
        return attn_output, attn_weights


class DeluluFeedForward(nn.Module):
    def __init__(self, config: DeluluConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]
        self.intermediate_dropout = nn.Dropout(config.activation_dropout)
        self.output_dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.intermediate_dropout(
            self.intermediate_act_fn(self.intermediate_dense(hidden_states))
        )
        return self.output_dropout(self.output_dense(hidden_states))


class DeluluEncoderLayer(GradientCheckpointingLayer):
    """Transformer layer; post-LN (HuBERT Base) or pre-LN when ``config.do_stable_layer_norm``."""

    def __init__(self, config: DeluluConfig):
        super().__init__()
        self.pre_norm = config.do_stable_layer_norm
        self.attention = DeluluAttention(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = DeluluFeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        if self.pre_norm:
            hidden_states = self.layer_norm(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = residual + self.dropout(hidden_states)
        if self.pre_norm:
            return hidden_states + self.feed_forward(self.final_layer_norm(hidden_states))
        hidden_states = self.layer_norm(hidden_states)
        return self.final_layer_norm(hidden_states + self.feed_forward(hidden_states))


class DeluluEncoder(nn.Module):
    def __init__(self, config: DeluluConfig):
        super().__init__()
        self.config = config
        self.pos_conv_embed = DeluluPositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([DeluluEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        # When set (see `DeluluPreTrainedModel.set_layerdrop_seed`), LayerDrop draws from this seed
        # instead of the global RNG, so every process of a distributed run skips the same layers.
        self.layerdrop_seed: int | None = None

    def layerdrop_skips(self) -> list[bool]:
        """Which layers this forward pass skips (LayerDrop, arXiv 1909.11556; none in eval mode)."""
        if not (self.training and self.config.layerdrop > 0.0):
            return [False] * len(self.layers)
        generator = None
        if self.layerdrop_seed is not None:
            generator = torch.Generator().manual_seed(self.layerdrop_seed)
        return (torch.rand(len(self.layers), generator=generator) < self.config.layerdrop).tolist()

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        """``attention_mask`` is the frame-level mask ``(batch, frames)`` (True/1 = real frame)."""
        if attention_mask is not None:
            # Padded frames are zeroed so the position conv sees exactly the zeros an unpadded run pads with.
            hidden_states = hidden_states.masked_fill(~attention_mask.bool()[..., None], 0.0)
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        hidden_states = hidden_states + self.pos_conv_embed(hidden_states)
        if not self.config.do_stable_layer_norm:
            hidden_states = self.layer_norm(hidden_states)
        hidden_states = self.dropout(hidden_states)

        for layer, skipped in zip(self.layers, self.layerdrop_skips()):
            if not skipped:
                hidden_states = layer(hidden_states, attention_mask, **kwargs)

        if self.config.do_stable_layer_norm:
            hidden_states = self.layer_norm(hidden_states)
        return BaseModelOutput(last_hidden_state=hidden_states)


# ----------------------------------------------------------------------------------------------
# Pretrained-model base
# ----------------------------------------------------------------------------------------------


class DeluluPreTrainedModel(Wav2Vec2PreTrainedModel):
    """Weight init, frame arithmetic and saving shared by all DELULU classes."""

    config_class = DeluluConfig
    config: DeluluConfig
    base_model_prefix = "delulu"
    main_input_name = "input_values"
    input_modalities = "audio"
    _no_split_modules = ["DeluluEncoderLayer", "DeluluConvLayer"]
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_record_outputs = {
        "hidden_states": DeluluEncoderLayer,
        "attentions": OutputRecorder(DeluluAttention, index=1, layer_name="encoder"),
    }

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise through `transformers.initialization`, which skips tensors loaded from a checkpoint.

        Every rule keys on the module that directly owns the parameters: when loading with missing
        keys, transformers re-initialises only modules with uninitialised parameters of their own.
        """
        if isinstance(module, nn.Conv1d) and hasattr(module, "parametrizations"):
            # The weight-normed position conv. fairseq: v ~ normal(0, 2 / sqrt(kernel * channels)) and
            # g = ||v|| (over all but the kernel axis), so that weight == v at init.
            parametrization = module.parametrizations.weight
            direction, magnitude = parametrization.original1, parametrization.original0
            std = 2 * math.sqrt(1 / (module.kernel_size[0] * module.in_channels))
            init.normal_(direction, mean=0.0, std=std)
            init.copy_(magnitude, torch.linalg.vector_norm(direction.detach(), dim=(0, 1), keepdim=True))
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_normal_(module.weight)
            if module.bias is not None:
                bound = math.sqrt(module.groups / (module.in_channels * module.kernel_size[0]))
                init.uniform_(module.bias, a=-bound, b=bound)
        elif isinstance(module, DeluluModel):
            init.uniform_(module.masked_spec_embed)
        elif isinstance(module, DeluluForPreTraining):
            # Cosine logits only see directions; a normal init spreads them evenly (fairseq's uniform(0, 1)
            # puts every cluster embedding in the positive orthant).
            init.normal_(module.label_embeddings, mean=0.0, std=1.0)
        elif isinstance(module, (DeluluForSequenceClassification, DeluluForXVector)):
            if module.config.use_weighted_layer_sum:
                init.constant_(module.layer_weights, 1.0 / (module.config.num_hidden_layers + 1))
        else:
            # Linear (normal, std=initializer_range), LayerNorm, AMSoftmaxLoss: the transformers/wav2vec2 rules.
            super()._init_weights(module)

    def _get_feat_extract_output_lengths(
        self, input_lengths: int | torch.Tensor, add_adapter: bool | None = None
    ) -> int | torch.Tensor:
        """Encoder frames for ``input_lengths`` samples (``add_adapter`` is accepted for wav2vec2 API parity)."""
        return feat_extract_output_lengths(self.config, input_lengths)

    def set_layerdrop_seed(self, seed: int | None) -> None:
        """Draw the next forward pass's LayerDrop from ``seed`` (``None``: the global RNG, the default).

        A distributed training loop passes the same seed on every process (e.g. derived from the
        update step), so all processes skip the same layers: under FSDP/DeepSpeed each layer's
        all-gather must happen on every rank, and under DDP the skipped layers stay consistent.
        """
        for module in self.modules():
            if isinstance(module, DeluluEncoder):
                module.layerdrop_seed = None if seed is None else int(seed)

    def _frame_attention_mask(self, num_frames: int, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sample-level mask ``(batch, samples)`` -> bool frame mask ``(batch, num_frames)``; rejects empty items."""
        lengths = feat_extract_output_lengths(self.config, attention_mask.sum(-1).long())
        if bool((lengths < 1).any()):
            bad = [(i, int(attention_mask[i].sum())) for i in torch.nonzero(lengths < 1).flatten().tolist()]
            raise ValueError(
                f"batch items {[i for i, _ in bad]} have {[n for _, n in bad]} unpadded samples, fewer than the "
                f"encoder's receptive field of {receptive_field(self.config)} samples (no output frame)."
            )
        return torch.arange(num_frames, device=attention_mask.device)[None, :] < lengths[:, None]

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args,
        feature_extractor: Wav2Vec2FeatureExtractor | bool | None = None,
        **kwargs,
    ):
        """`PreTrainedModel.save_pretrained`, plus what makes a DELULU folder self-sufficient.

        - ``config.json`` gets an ``auto_map`` for all five Auto classes, whichever class is saved,
          and ``configuration_delulu.py`` / ``modeling_delulu.py`` are copied next to the weights,
          so the folder loads with ``trust_remote_code=True`` where ``delulu_hf`` is not installed.
        - A ``preprocessor_config.json`` is written so ``AutoFeatureExtractor`` works: the given
          ``feature_extractor``, else the folder's existing one is kept, else
          :func:`default_feature_extractor`. Pass ``feature_extractor=False`` to skip it.
        """
        push_to_hub = kwargs.pop("push_to_hub", False)
        self.config.auto_map = dict(DELULU_AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and feature_extractor is not False:
            if isinstance(feature_extractor, Wav2Vec2FeatureExtractor):
                feature_extractor.save_pretrained(save_directory)
            elif not os.path.exists(os.path.join(save_directory, FEATURE_EXTRACTOR_NAME)):
                default_feature_extractor(self.config).save_pretrained(save_directory)
        if push_to_hub:
            # `push_to_hub` re-saves through this method into a temporary folder, so the feature
            # extractor and the code files are uploaded too.
            hub_keys = ("commit_message", "private", "token", "create_pr", "revision")
            repo_id = kwargs.get("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            self.push_to_hub(repo_id, **{k: kwargs[k] for k in hub_keys if k in kwargs})


# ----------------------------------------------------------------------------------------------
# Base model
# ----------------------------------------------------------------------------------------------


class DeluluModel(DeluluPreTrainedModel):
    """The bare DELULU encoder: waveform -> ``last_hidden_state`` ``(batch, frames, hidden_size)``.

    16 ms frames: ``frames = feat_extract_output_lengths(config, samples)`` (62 for 1 s at 16 kHz).
    """

    # Loading the encoder (or a downstream head) from a pretraining checkpoint drops the cluster head
    # silently: it is expected, not a problem to report.
    _keys_to_ignore_on_load_unexpected = [r"^final_proj\.", r"^label_embeddings$", r"^distill_head\."]

    def __init__(self, config: DeluluConfig):
        super().__init__(config)
        self.config = config
        self.feature_extractor = DeluluFeatureEncoder(config)
        self.feature_projection = DeluluFeatureProjection(config)
        # Always present: pretraining collators may pass `mask_time_indices` even when mask_time_prob is 0.
        self.masked_spec_embed = nn.Parameter(torch.empty(config.hidden_size))
        self.encoder = DeluluEncoder(config)
        self.post_init()

    def freeze_feature_encoder(self) -> None:
        """Stop gradients into the conv feature encoder (as in wav2vec2 fine-tuning)."""
        self.feature_extractor._freeze_parameters()

    def _mask_hidden_states(
        self,
        hidden_states: torch.Tensor,
        mask_time_indices: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replace masked frames by the learned mask embedding (and zero masked channels, if configured).

        ``mask_time_indices`` from the caller are always applied; otherwise spans are drawn only in
        training with ``config.apply_spec_augment``, within each item's unpadded frames.
        """
        batch_size, num_frames, hidden_size = hidden_states.shape
        if mask_time_indices is None and self.config.apply_spec_augment and self.training:
            if self.config.mask_time_prob > 0:
                mask_time_indices = self.compute_mask_time_indices(batch_size, num_frames, attention_mask)
        if mask_time_indices is not None:
            if mask_time_indices.shape != (batch_size, num_frames):
                raise ValueError(
                    f"mask_time_indices has shape {tuple(mask_time_indices.shape)} but the encoder produced "
                    f"{num_frames} frames for a batch of {batch_size}: expected ({batch_size}, {num_frames})."
                )
            mask = mask_time_indices.to(device=hidden_states.device, dtype=torch.bool)[..., None]
            hidden_states = torch.where(mask, self.masked_spec_embed.to(hidden_states.dtype), hidden_states)
        if self.config.apply_spec_augment and self.training and self.config.mask_feature_prob > 0:
            feature_mask = _compute_mask_indices(
                (batch_size, hidden_size),
                mask_prob=self.config.mask_feature_prob,
                mask_length=self.config.mask_feature_length,
                min_masks=self.config.mask_feature_min_masks,
            )
            feature_mask = torch.as_tensor(feature_mask, device=hidden_states.device, dtype=torch.bool)
            hidden_states = hidden_states.masked_fill(feature_mask[:, None, :], 0.0)
        return hidden_states

    def compute_mask_time_indices(
        self, batch_size: int, num_frames: int, frame_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """HuBERT span mask ``(batch, frames)`` bool from the config's mask_time_* settings (numpy RNG)."""
        mask = _compute_mask_indices(
            (batch_size, num_frames),
            mask_prob=self.config.mask_time_prob,
            mask_length=self.config.mask_time_length,
            attention_mask=frame_attention_mask,
            min_masks=self.config.mask_time_min_masks,
        )
        mask = torch.as_tensor(mask, dtype=torch.bool, device=self.masked_spec_embed.device)
        if frame_attention_mask is not None:
            mask &= frame_attention_mask.to(mask.device).bool()
        return mask

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Wav2Vec2BaseModelOutput:
        r"""
        Returns `last_hidden_state` and, as `Wav2Vec2Model` does, `extract_features` (the conv front end's
        output, `(batch_size, frames, conv_dim[-1])`).

        Args:
            input_values (`torch.FloatTensor` of shape `(batch_size, samples)`): 16 kHz waveforms, e.g. from
                `Wav2Vec2FeatureExtractor` (see `default_feature_extractor`).
            attention_mask (`torch.LongTensor` of shape `(batch_size, samples)`, *optional*): 1 for real
                samples, 0 for padding. A padded item's outputs equal those of its unpadded run.
            mask_time_indices (`torch.BoolTensor` of shape `(batch_size, frames)`, *optional*): frames to
                replace by the learned mask embedding (e.g. drawn by a pretraining collator).
            output_hidden_states / output_attentions: the input to every transformer layer plus the last
                output (`num_hidden_layers + 1` tensors) / every layer's attention weights (eager only).
        """
        if input_values.dim() != 2:
            raise ValueError(
                f"input_values must be (batch_size, samples), got shape {tuple(input_values.shape)}."
            )
        if input_values.shape[-1] < receptive_field(self.config):
            raise ValueError(
                f"input_values has {input_values.shape[-1]} samples, fewer than the encoder's receptive field "
                f"of {receptive_field(self.config)} samples."
            )
        extract_features = self.feature_extractor(input_values)
        if self.training and self.config.feature_grad_mult != 1.0:
            extract_features = _GradMultiply.apply(extract_features, float(self.config.feature_grad_mult))
        frame_mask = None
        if attention_mask is not None:
            frame_mask = self._frame_attention_mask(extract_features.shape[1], attention_mask)
        hidden_states = self.feature_projection(extract_features)
        hidden_states = self._mask_hidden_states(hidden_states, mask_time_indices, frame_mask)
        encoder_outputs = self.encoder(hidden_states, attention_mask=frame_mask, **kwargs)
        return Wav2Vec2BaseModelOutput(
            last_hidden_state=encoder_outputs.last_hidden_state, extract_features=extract_features
        )


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------


@dataclass
class DeluluForPreTrainingOutput(ModelOutput):
    r"""Output of [`DeluluForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): ``cluster_loss_weight * (masked_loss + denoise_loss_weight *
            denoise_loss) + distill_loss_weight * distill_loss + feature_penalty_weight * feature_penalty``
            (terms with weight 0 or without their inputs are left out); present when `labels` or
            `teacher_targets` are given.
        masked_loss (`torch.FloatTensor` of shape `()`): mean cross-entropy over masked, labelled frames
            (0 when there are none).
        denoise_loss (`torch.FloatTensor` of shape `()`): mean cross-entropy over unmasked, labelled frames
            of corrupted items (0 when there are none).
        feature_penalty (`torch.FloatTensor` of shape `()`): mean squared conv feature over real frames
            (HuBERT's feature penalty; computed always, weighted by `feature_penalty_weight` in `loss`).
        masked_loss_sum, denoise_loss_sum (`torch.FloatTensor` of shape `()`): the same cross-entropies
            summed over frames, so a training loop can normalise by the frames of a whole update (all
            micro-batches and processes) instead of averaging per-batch means.
        distill_loss, distill_loss_sum (`torch.FloatTensor` of shape `()`): the regression onto `teacher_targets`
            (see `DeluluConfig.distill_loss`), mean and sum over the distilled frames; present when
            `teacher_targets` are given.
        distill_cosine_sum, distill_count: summed cosine between prediction and target, and the number of
            distilled frames (a loss-independent progress measure: mean cosine = sum / count).
        logits (`torch.FloatTensor` of shape `(batch_size, frames, num_clusters)`): cosine logits / temperature,
            float32, for every frame.
        mask_time_indices (`torch.BoolTensor` of shape `(batch_size, frames)`): the frames that were masked.
        masked_correct, masked_count, denoise_correct, denoise_count (`torch.LongTensor` of shape `()`):
            argmax hits and frame counts of the two terms, so accuracy can be summed exactly across batches.
        hidden_states, attentions: as in [`DeluluModel`].
    """

    loss: torch.FloatTensor | None = None
    masked_loss: torch.FloatTensor | None = None
    denoise_loss: torch.FloatTensor | None = None
    feature_penalty: torch.FloatTensor | None = None
    masked_loss_sum: torch.FloatTensor | None = None
    denoise_loss_sum: torch.FloatTensor | None = None
    distill_loss: torch.FloatTensor | None = None
    distill_loss_sum: torch.FloatTensor | None = None
    distill_cosine_sum: torch.FloatTensor | None = None
    distill_count: torch.LongTensor | None = None
    logits: torch.FloatTensor | None = None
    mask_time_indices: torch.BoolTensor | None = None
    masked_correct: torch.LongTensor | None = None
    masked_count: torch.LongTensor | None = None
    denoise_correct: torch.LongTensor | None = None
    denoise_count: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class DeluluForPreTraining(DeluluPreTrainedModel):
    """DELULU with the masked-cluster prediction + denoising head used for pretraining.

    Logits are HuBERT's: ``cosine(final_proj(h_t), e_c) / logit_temperature`` over ``num_clusters``
    learned cluster embeddings ``e_c``. The loss has two terms over labelled frames
    (``labels != -100`` and inside the attention mask):

    - ``masked_loss``: cross-entropy on masked frames of every item. On corrupted items this is
      already WavLM's denoising masked prediction: the input is noisy, the labels are clean.
    - ``denoise_loss``: cross-entropy on the *unmasked* frames of corrupted items
      (``corrupted[b]`` is True), where the model sees the corrupted frame and must still name the
      clean primary speaker's cluster; it pushes the encoder to suppress the interferer.

    With ``config.distill_loss_weight > 0`` a linear ``distill_head`` on the last layer regresses
    the teacher's frame features that the training loop passes as ``teacher_targets`` (already aligned
    to the 16 ms frames and standardised; the teacher itself never enters this file):

    ``loss = cluster_loss_weight * (masked_loss + denoise_loss_weight * denoise_loss)
    + distill_loss_weight * distill_loss + feature_penalty_weight * feature_penalty``
    (terms whose weight is 0, or whose inputs are not given, are left out; see `DeluluConfig`).
    """

    def __init__(self, config: DeluluConfig):
        super().__init__(config)
        self.delulu = DeluluModel(config)
        self.final_proj = nn.Linear(config.hidden_size, config.final_dim)
        self.label_embeddings = nn.Parameter(torch.empty(config.num_clusters, config.final_dim))
        if config.distill_loss_weight > 0:
            if config.distill_dim is None:
                raise ValueError(
                    "distill_loss_weight > 0 needs config.distill_dim (the width of the teacher targets, e.g. "
                    "192 for the demo teacher's window embeddings): the distillation head is sized by it."
                )
            self.distill_head = nn.Linear(config.hidden_size, config.distill_dim)
        self.post_init()

    def freeze_feature_encoder(self) -> None:
        self.delulu.freeze_feature_encoder()

    def cluster_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(batch, frames, hidden)`` -> float32 cosine logits ``(batch, frames, num_clusters)``."""
        projected = F.normalize(self.final_proj(hidden_states).float(), dim=-1)
        embeddings = F.normalize(self.label_embeddings.float(), dim=-1)
        return projected @ embeddings.t() / self.config.logit_temperature

    @can_return_tuple
    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
        corrupted: torch.Tensor | None = None,
        teacher_targets: torch.Tensor | None = None,
        distill_frames: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DeluluForPreTrainingOutput:
        r"""
        Args:
            input_values (`torch.FloatTensor` of shape `(batch_size, samples)`): the (possibly corrupted) waveforms.
            attention_mask (`torch.LongTensor` of shape `(batch_size, samples)`, *optional*): 1 = real sample.
            labels (`torch.LongTensor` of shape `(batch_size, frames)`, *optional*): cluster ids of the clean
                primary utterance per encoder frame, `-100` = ignore. `frames` must equal the encoder's frame
                count for `samples`.
            mask_time_indices (`torch.BoolTensor` of shape `(batch_size, frames)`, *optional*): frames to mask.
                When omitted, spans are drawn from the config in training mode; in eval mode nothing is masked.
            corrupted (`torch.BoolTensor` of shape `(batch_size,)`, *optional*): which items the collator
                corrupted (noise or another utterance mixed in). `None` means none were.
            teacher_targets (`torch.FloatTensor` of shape `(batch_size, frames, distill_dim)`, *optional*): the
                teacher's features of the *clean* primary utterance at every encoder frame, for the distillation
                head (needs `config.distill_loss_weight > 0`).
            distill_frames (`torch.BoolTensor` of shape `(batch_size, frames)`, *optional*): frames the regression
                covers. When omitted: `distill_frame_selection(config, real frames, mask_time_indices)`, the
                selection `delulu_hf.pretraining.distill` also uses to count an update's frames.
        """
        batch_size, num_samples = input_values.shape[0], input_values.shape[-1]
        num_frames = feat_extract_output_lengths(self.config, num_samples)
        if labels is not None:
            if labels.dim() != 2 or labels.shape[0] != batch_size or labels.shape[1] != num_frames:
                raise ValueError(
                    f"labels have shape {tuple(labels.shape)} ({labels.shape[-1]} frames) but the encoder produces "
                    f"{num_frames} frames for {num_samples} samples: expected labels of shape "
                    f"({batch_size}, {num_frames}). Align labels with `feat_extract_output_lengths`."
                )
            bad = (labels != -100) & ((labels < 0) | (labels >= self.config.num_clusters))
            if bool(bad.any()):
                raise ValueError(
                    f"labels must be -100 or cluster ids in [0, {self.config.num_clusters}), found "
                    f"{labels[bad][:5].tolist()} in batch items {torch.nonzero(bad)[:, 0].unique().tolist()}."
                )
        if corrupted is not None and corrupted.shape != (batch_size,):
            raise ValueError(f"corrupted must have shape ({batch_size},), got {tuple(corrupted.shape)}.")

        frame_mask = None
        if attention_mask is not None:
            frame_mask = self._frame_attention_mask(num_frames, attention_mask)
        if mask_time_indices is None and self.training and self.config.apply_spec_augment:
            if self.config.mask_time_prob > 0:
                mask_time_indices = self.delulu.compute_mask_time_indices(batch_size, num_frames, frame_mask)
        if mask_time_indices is not None:
            mask_time_indices = mask_time_indices.to(device=input_values.device, dtype=torch.bool)

        outputs = self.delulu(
            input_values, attention_mask=attention_mask, mask_time_indices=mask_time_indices, **kwargs
        )
        logits = self.cluster_logits(outputs.last_hidden_state)
        feature_penalty = _feature_penalty(outputs.extract_features, frame_mask)

        loss = masked_loss = denoise_loss = masked_sum = denoise_sum = None
        masked_correct = masked_count = denoise_correct = denoise_count = None
        distill_loss = distill_sum = distill_cosine = distill_count = None
        if teacher_targets is not None:
            distill_sum, distill_cosine, distill_count = self._distill(
                outputs.last_hidden_state, teacher_targets, distill_frames, frame_mask, mask_time_indices
            )
            distill_loss = distill_sum / distill_count.clamp(min=1)
        if labels is not None:
            labels = labels.to(logits.device)
            labelled = labels != -100
            if frame_mask is not None:
                labelled &= frame_mask
            masked = torch.zeros_like(labelled) if mask_time_indices is None else mask_time_indices
            masked_frames = labelled & masked
            denoise_frames = labelled & ~masked
            if corrupted is None:
                denoise_frames = torch.zeros_like(denoise_frames)
            else:
                denoise_frames &= corrupted.to(device=logits.device, dtype=torch.bool)[:, None]
            masked_sum, masked_correct, masked_count = _frame_cross_entropy(logits, labels, masked_frames)
            denoise_sum, denoise_correct, denoise_count = _frame_cross_entropy(logits, labels, denoise_frames)
            masked_loss = masked_sum / masked_count.clamp(min=1)
            denoise_loss = denoise_sum / denoise_count.clamp(min=1)
            loss = masked_loss
            if self.config.denoise_loss_weight > 0:
                loss = loss + self.config.denoise_loss_weight * denoise_loss
            if self.config.cluster_loss_weight != 1:
                loss = self.config.cluster_loss_weight * loss
        if distill_loss is not None:
            weighted = self.config.distill_loss_weight * distill_loss
            loss = weighted if loss is None else loss + weighted
        if loss is not None and self.config.feature_penalty_weight > 0:
            loss = loss + self.config.feature_penalty_weight * feature_penalty

        return DeluluForPreTrainingOutput(
            loss=loss,
            masked_loss=masked_loss,
            denoise_loss=denoise_loss,
            feature_penalty=feature_penalty,
            masked_loss_sum=masked_sum,
            denoise_loss_sum=denoise_sum,
            distill_loss=distill_loss,
            distill_loss_sum=distill_sum,
            distill_cosine_sum=distill_cosine,
            distill_count=distill_count,
            logits=logits,
            mask_time_indices=mask_time_indices,
            masked_correct=masked_correct,
            masked_count=masked_count,
            denoise_correct=denoise_correct,
            denoise_count=denoise_count,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _distill(
        self,
        hidden_states: torch.Tensor,
        targets: torch.Tensor,
        selected: torch.Tensor | None,
        frame_mask: torch.Tensor | None,
        mask_time_indices: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed regression loss, summed cosine and count over the distilled frames."""
        if not hasattr(self, "distill_head"):
            raise ValueError(
                "teacher_targets were given but this model has no distillation head: set "
                "config.distill_loss_weight > 0 and config.distill_dim before building it."
            )
        batch_size, num_frames = hidden_states.shape[:2]
        if targets.shape != (batch_size, num_frames, self.config.distill_dim):
            raise ValueError(
                f"teacher_targets have shape {tuple(targets.shape)}, expected ({batch_size}, {num_frames}, "
                f"{self.config.distill_dim}) (batch, encoder frames, distill_dim)."
            )
        if selected is None:
            real = torch.ones(batch_size, num_frames, dtype=torch.bool, device=hidden_states.device)
            if frame_mask is not None:
                real = frame_mask.to(real.device)
            selected = distill_frame_selection(self.config, real, mask_time_indices)
        selected = selected.to(device=hidden_states.device, dtype=torch.bool)
        predicted = self.distill_head(hidden_states[selected]).float()
        target = targets.to(hidden_states.device)[selected].float()
        count = selected.sum()
        if target.shape[0] == 0:  # keep the graph connected, as _frame_cross_entropy does
            zero = self.distill_head(hidden_states[:, :1]).sum() * 0.0
            return zero, zero.detach(), count
        cosine = F.cosine_similarity(predicted, target, dim=-1, eps=1e-6)
        kind = self.config.distill_loss
        if kind == "cosine":
            per_frame = 1.0 - cosine
        elif kind == "l1_cosine":  # DistilHuBERT: L1 - log sigmoid(cos)
            per_frame = (predicted - target).abs().mean(-1) - F.logsigmoid(cosine)
        elif kind == "l1":
            per_frame = (predicted - target).abs().mean(-1)
        else:
            per_frame = (predicted - target).pow(2).mean(-1)
        return per_frame.sum(), cosine.detach().sum(), count


def distill_frame_selection(
    config: DeluluConfig, real_frames: torch.Tensor, mask_time_indices: torch.Tensor | None
) -> torch.Tensor:
    """The frames the distillation loss covers, ``(batch, frames)`` bool: real frames, all of them or the
    masked / unmasked ones (``config.distill_frames``). One definition for the model and for the training
    loop, which counts an update's distilled frames before the forward pass."""
    real = real_frames.bool()
    if config.distill_frames == "all":
        return real
    masked = torch.zeros_like(real) if mask_time_indices is None else mask_time_indices.to(real.device).bool()
    return real & masked if config.distill_frames == "masked" else real & ~masked


def _frame_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy, argmax hits and count over the ``selected`` frames (0 loss when none)."""
    picked_logits, picked_labels = logits[selected], labels[selected]
    count = selected.sum()
    if picked_labels.numel() == 0:
        # Keep the graph connected so every parameter still gets a (zero) gradient.
        return logits.sum() * 0.0, count.new_zeros(()), count
    loss = F.cross_entropy(picked_logits, picked_labels, reduction="sum")
    correct = (picked_logits.argmax(-1) == picked_labels).sum()
    return loss, correct, count


def _feature_penalty(features: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared conv feature over real frames and channels (fairseq HuBERT's ``features_pen``,
    there over padding too; here padding-invariant)."""
    squared = features.float().pow(2).mean(-1)
    if frame_mask is None:
        return squared.mean()
    mask = frame_mask.to(squared.dtype)
    return (squared * mask).sum() / mask.sum().clamp(min=1)


def _weighted_layer_sum(hidden_states: tuple[torch.Tensor, ...], layer_weights: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted sum of all layers' hidden states (SUPERB-style)."""
    stacked = torch.stack(hidden_states, dim=1)
    weights = F.softmax(layer_weights, dim=-1).to(stacked.dtype)
    return (stacked * weights.view(-1, 1, 1)).sum(dim=1)


class DeluluForSequenceClassification(DeluluPreTrainedModel):
    """DELULU with a mean-pooled linear classifier (same semantics as `Wav2Vec2ForSequenceClassification`)."""

    def __init__(self, config: DeluluConfig):
        super().__init__(config)
        self.delulu = DeluluModel(config)
        if config.use_weighted_layer_sum:
            self.layer_weights = nn.Parameter(
                torch.ones(config.num_hidden_layers + 1) / (config.num_hidden_layers + 1)
            )
        self.projector = nn.Linear(config.hidden_size, config.classifier_proj_size)
        self.classifier = nn.Linear(config.classifier_proj_size, config.num_labels)
        self.post_init()

    def freeze_feature_encoder(self) -> None:
        self.delulu.freeze_feature_encoder()

    def freeze_base_model(self) -> None:
        """Train only the head."""
        for param in self.delulu.parameters():
            param.requires_grad = False

    @can_return_tuple
    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class ids for the cross-entropy
                loss (mean-squared error when `config.num_labels == 1`).
        """
        if self.config.use_weighted_layer_sum:
            kwargs["output_hidden_states"] = True
        outputs = self.delulu(input_values, attention_mask=attention_mask, **kwargs)
        if self.config.use_weighted_layer_sum:
            hidden_states = _weighted_layer_sum(outputs.hidden_states, self.layer_weights)
        else:
            hidden_states = outputs.last_hidden_state
        hidden_states = self.projector(hidden_states)
        if attention_mask is None:
            pooled = hidden_states.mean(dim=1)
        else:
            frame_mask = self._frame_attention_mask(hidden_states.shape[1], attention_mask)
            weights = frame_mask.to(hidden_states.dtype)[..., None]
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1)
        logits = self.classifier(pooled)

        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
            else:
                loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class DeluluForXVector(DeluluPreTrainedModel):
    """DELULU with an x-vector (TDNN + statistics pooling + AM-softmax) head, as `Wav2Vec2ForXVector`."""

    def __init__(self, config: DeluluConfig):
        super().__init__(config)
        self.delulu = DeluluModel(config)
        if config.use_weighted_layer_sum:
            self.layer_weights = nn.Parameter(
                torch.ones(config.num_hidden_layers + 1) / (config.num_hidden_layers + 1)
            )
        self.projector = nn.Linear(config.hidden_size, config.tdnn_dim[0])
        self.tdnn = nn.ModuleList([TDNNLayer(config, i) for i in range(len(config.tdnn_dim))])
        self.feature_extractor = nn.Linear(config.tdnn_dim[-1] * 2, config.xvector_output_dim)
        self.classifier = nn.Linear(config.xvector_output_dim, config.xvector_output_dim)
        self.objective = AMSoftmaxLoss(config.xvector_output_dim, config.num_labels)
        self.post_init()

    def freeze_feature_encoder(self) -> None:
        self.delulu.freeze_feature_encoder()

    def freeze_base_model(self) -> None:
        """Train only the head."""
        for param in self.delulu.parameters():
            param.requires_grad = False

    def _get_tdnn_output_lengths(self, input_lengths: int | torch.Tensor) -> int | torch.Tensor:
        for kernel_size, dilation in zip(self.config.tdnn_kernel, self.config.tdnn_dilation):
            input_lengths = input_lengths - dilation * (kernel_size - 1)
        return input_lengths

    @can_return_tuple
    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> XVectorOutput:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): speaker ids for the AM-softmax loss.
        """
        if self.config.use_weighted_layer_sum:
            kwargs["output_hidden_states"] = True
        outputs = self.delulu(input_values, attention_mask=attention_mask, **kwargs)
        if self.config.use_weighted_layer_sum:
            hidden_states = _weighted_layer_sum(outputs.hidden_states, self.layer_weights)
        else:
            hidden_states = outputs.last_hidden_state
        hidden_states = self.projector(hidden_states)
        for tdnn_layer in self.tdnn:
            hidden_states = tdnn_layer(hidden_states)

        # Statistics pooling over each item's own frames (mean and unbiased std, as torch.std).
        num_frames = hidden_states.shape[1]
        if attention_mask is None:
            lengths = torch.full((hidden_states.shape[0],), num_frames, device=hidden_states.device)
        else:
            frame_lengths = feat_extract_output_lengths(self.config, attention_mask.sum(-1).long())
            lengths = self._get_tdnn_output_lengths(frame_lengths).clamp(min=1).to(hidden_states.device)
        weights = torch.arange(num_frames, device=hidden_states.device)[None, :] < lengths[:, None]
        weights = weights.to(hidden_states.dtype)[..., None]
        count = weights.sum(dim=1)
        mean = (hidden_states * weights).sum(dim=1) / count
        var = (((hidden_states - mean[:, None]) ** 2) * weights).sum(dim=1) / (count - 1).clamp(min=1)
        statistic_pooling = torch.cat([mean, var.sqrt()], dim=-1)

        output_embeddings = self.feature_extractor(statistic_pooling)
        logits = self.classifier(output_embeddings)
        loss = self.objective(logits, labels) if labels is not None else None
        return XVectorOutput(
            loss=loss,
            logits=logits,
            embeddings=output_embeddings,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


for _cls, _auto in (
    (DeluluModel, "AutoModel"),
    (DeluluForPreTraining, "AutoModelForPreTraining"),
    (DeluluForXVector, "AutoModelForAudioXVector"),
    (DeluluForSequenceClassification, "AutoModelForAudioClassification"),
):
    # Marks the classes as custom code, so `save_pretrained` copies this file and its config next to the weights.
    _cls.register_for_auto_class(_auto)

__all__ = [
    "DeluluForPreTraining",
    "DeluluForPreTrainingOutput",
    "DeluluForSequenceClassification",
    "DeluluForXVector",
    "DeluluModel",
    "DeluluPreTrainedModel",
    "default_feature_extractor",
    "distill_frame_selection",
    "feat_extract_output_lengths",
    "receptive_field",
]
