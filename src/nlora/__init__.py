"""nlora: continual learning of language models with sparse low-rank adapters (N-LoRA)."""

__version__ = "0.1.0"
