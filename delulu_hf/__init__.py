"""delulu-hf: DELULU speaker-aware self-supervised speech encoder for Hugging Face Transformers.

Importing the package registers DELULU with the transformers Auto classes (`AutoConfig`,
`AutoModel`, `AutoModelForPreTraining`, `AutoModelForAudioXVector`,
`AutoModelForAudioClassification`). Only the config and modeling modules are imported here, so
``import delulu_hf`` stays light.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForAudioXVector,
    AutoModelForPreTraining,
)

from .configuration_delulu import DeluluConfig
from .modeling_delulu import (
    DeluluForPreTraining,
    DeluluForPreTrainingOutput,
    DeluluForSequenceClassification,
    DeluluForXVector,
    DeluluModel,
    DeluluPreTrainedModel,
    default_feature_extractor,
    feat_extract_output_lengths,
    receptive_field,
)

__version__ = "0.1.0"

# Never `exist_ok=True`: that would silently replace a built-in model type of the same name.
AutoConfig.register(DeluluConfig.model_type, DeluluConfig)
AutoModel.register(DeluluConfig, DeluluModel)
AutoModelForPreTraining.register(DeluluConfig, DeluluForPreTraining)
AutoModelForAudioXVector.register(DeluluConfig, DeluluForXVector)
AutoModelForAudioClassification.register(DeluluConfig, DeluluForSequenceClassification)

__all__ = [
    "DeluluConfig",
    "DeluluForPreTraining",
    "DeluluForPreTrainingOutput",
    "DeluluForSequenceClassification",
    "DeluluForXVector",
    "DeluluModel",
    "DeluluPreTrainedModel",
    "__version__",
    "default_feature_extractor",
    "feat_extract_output_lengths",
    "receptive_field",
]
