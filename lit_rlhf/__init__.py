"""lit_rlhf: align language models on PyTorch Lightning, one base model carrying many LoRA adapters."""

__version__ = "0.1.0"
