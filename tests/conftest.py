"""Shared fixtures: the real default model, loaded once per session."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lowbit.models.default import default_model_path


@pytest.fixture(scope="session")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="session")
def smol(gguf_path):
    """(our fp32 model, tokenizer, checkpoint) for SmolLM2-135M-Instruct."""
    from lowbit.loading.loader import load_model

    return load_model(gguf_path, "fp32", "cpu")


@pytest.fixture(scope="session")
def hf_smol(gguf_path):
    """transformers' own LlamaForCausalLM, loaded by transformers' own GGUF reader."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


def run_cli(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Runs `lowbit ARGS` in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, gguf_path):
    """`lowbit convert` of the default model to an fp32 HF directory, made once (test_convert checks
    it; test_cli_errors truncates a copy)."""
    out = tmp_path_factory.mktemp("conv") / "smollm2-hf"
    r = run_cli("convert", str(gguf_path), str(out), "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    return out


# Engine tests' prompts: a short fact, a long story start, a sequence, code, a question.
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a young girl who loved to read books about",
    "1, 2, 3, 4,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def prompt_ids(smol):
    """PROMPTS as token ids of the default model."""
    return [smol[1].encode(p) for p in PROMPTS]
