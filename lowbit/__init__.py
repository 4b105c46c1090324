"""lowbit: quantize LLMs, measure what it cost, run them fast."""
__version__ = "0.1.0"


def __getattr__(name):
    # `lowbit.quantize(...)` without importing torch at `import lowbit` time (PEP 562)
    if name == "quantize":
        from lowbit.quant.api import quantize

        return quantize
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
