"""The public API at the top level, each in a fresh interpreter as a user's script would be:
`from lowbit import LLM, SamplingParams` generates with the default model, and `import lowbit`
alone imports neither torch nor the engine (the names load on first use)."""
import json
import subprocess
import sys

import pytest

import lowbit


def _python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_llm_and_sampling_params_from_the_top_level_generate():
    out = _python("from lowbit import LLM, SamplingParams\n"
                  "llm = LLM('default', max_model_len=64, num_kv_blocks=8, device='cpu')\n"
                  "out = llm.generate('The capital of France is', SamplingParams(max_tokens=4, temperature=0))[0]\n"
                  "import json; print(json.dumps([out.text, len(out.token_ids), out.finish_reason]))\n")
    text, n_tokens, reason = json.loads(out)
    assert n_tokens == 4 and reason == "length" and text.startswith(" Paris"), text


def test_import_lowbit_stays_cheap():
    out = _python("import sys, json, lowbit\n"
                  "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('lowbit.'))))\n")
    assert json.loads(out) == ["lowbit.errors"]


def test_every_public_name_resolves_to_its_module():
    from lowbit.engine.llm import LLM
    from lowbit.engine.outputs import RequestOutput
    from lowbit.engine.sampling_params import SamplingParams
    from lowbit.engine.structured_output import StructuredOutput
    from lowbit.errors import LowbitError
    from lowbit.loading.loader import load_model
    from lowbit.quant.api import quantize

    expected = {"LLM": LLM, "SamplingParams": SamplingParams, "RequestOutput": RequestOutput,
                "load_model": load_model, "quantize": quantize, "LowbitError": LowbitError,
                "StructuredOutput": StructuredOutput}
    assert set(lowbit.__all__) == set(expected)
    assert {name: getattr(lowbit, name) for name in lowbit.__all__} == expected
    assert set(lowbit.__all__) <= set(dir(lowbit))
    with pytest.raises(AttributeError, match="nothing_here"):
        lowbit.nothing_here  # noqa: B018
