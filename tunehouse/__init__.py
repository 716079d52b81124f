"""tunehouse: a self-hosted fine-tuning platform for open LLMs."""

__version__ = "0.1.0"
