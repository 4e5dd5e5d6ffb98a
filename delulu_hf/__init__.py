"""delulu-hf: DELULU speaker-aware self-supervised speech encoder for Hugging Face Transformers."""

__version__ = "0.1.0"
