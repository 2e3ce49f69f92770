"""genrec: generative recommendation in PyTorch, from raw logs to top-K recommendations."""

__version__ = "0.1.0"
