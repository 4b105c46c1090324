"""lowbit: quantize LLMs, measure what it cost, run them fast."""
__version__ = "0.1.0"
