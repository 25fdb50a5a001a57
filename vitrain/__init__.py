"""vitrain: config-driven training of Vision Transformers."""

__version__ = "0.3.0"
