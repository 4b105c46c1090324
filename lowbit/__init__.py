"""lowbit: quantize LLMs, measure what it cost, run them fast.

    from lowbit import LLM, SamplingParams
    llm = LLM("default")
    print(llm.generate("The capital of France is", SamplingParams(max_tokens=8))[0].text)

The public names load on first use (PEP 562), so `import lowbit` stays cheap: torch and the
engine are imported by the first `lowbit.LLM`, not by the import.
"""
from lowbit.errors import LowbitError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "LLM": "lowbit.engine.llm",
    "SamplingParams": "lowbit.engine.sampling_params",
    "StructuredOutput": "lowbit.engine.structured_output",
    "RequestOutput": "lowbit.engine.outputs",
    "load_model": "lowbit.loading.loader",
    "quantize": "lowbit.quant.api",
}

__all__ = ["LowbitError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # found once; later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
