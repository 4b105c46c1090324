"""`lowbit generate` and `lowbit chat` on the default model, as a user runs them."""
import os
import subprocess
import sys
import time

from conftest import run_cli

from lowbit.engine.llm import LLM
from lowbit.engine.sampling_params import SamplingParams


def test_generate_streams_the_engines_greedy_answer(smol):
    """The answer arrives piece by piece while the process runs, and is LLM.generate's text."""
    question, n = "What is the capital of France? Answer in two sentences.", 32
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "generate", "default", "-p", question,
                             "--max-new-tokens", str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    arrivals, out = [], b""
    while chunk := os.read(proc.stdout.fileno(), 4096):
        arrivals.append(time.monotonic())
        out += chunk
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0, err
    assert len(arrivals) >= 3, "the answer came in one piece: not streamed"
    assert arrivals[-1] - arrivals[0] > 0.05
    expect = LLM(smol, max_batch_size=1, max_model_len=128, num_kv_blocks=8).chat(
        [{"role": "user", "content": question}], SamplingParams(max_tokens=n))[0]
    assert "Paris" in expect.text
    assert out.decode() == expect.text
    assert f"[{len(expect.token_ids)} tokens;" in err


def test_chat_keeps_history_and_resets():
    """Greedy: the answer after /reset equals the answer to the same question asked first, with no
    history; with history it differs (one chat process: the default model loads once)."""
    q = "What is my name?"
    script = f"{q}\n/reset\nMy name is Ada. Remember it.\n{q}\n/reset\n{q}\n/exit\n"
    r = run_cli("chat", "default", "--temperature", "0", "--max-new-tokens", "16", input=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("(conversation cleared)") == 2
    turns = [t.strip() for t in r.stdout.replace("(conversation cleared)", "").split(">>>")[1:]]
    # after each ">>>": answer 1, (/reset), answers 2-3, (/reset), answer 4, (/exit)
    assert len(turns) == 7 and turns[1] == turns[4] == turns[6] == "", turns
    fresh, with_history, after_reset = turns[0], turns[3], turns[5]
    assert after_reset == fresh
    assert with_history != after_reset
