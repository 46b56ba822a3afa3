"""gemport: convert, quantize and validate Gemma checkpoints across runtimes."""

__version__ = "0.1.0"
