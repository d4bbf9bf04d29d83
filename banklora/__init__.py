"""banklora: LoRA fine-tuning of Gemma models on banking knowledge, CPU first."""

__version__ = "0.1.0"
