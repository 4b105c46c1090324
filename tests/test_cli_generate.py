"""`lowbit generate` and `lowbit chat` on the default model, as a user runs them."""
from conftest import run_cli


def test_generate_streams_an_answer():
    r = run_cli("generate", "default", "-p", "What is the capital of France?", "--max-new-tokens", "20")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_chat_keeps_history_and_resets():
    """Greedy: the answer after /reset equals a fresh one-shot answer; with history it differs."""
    q = "What is my name?"
    script = f"My name is Ada. Remember it.\n{q}\n/reset\n{q}\n/exit\n"
    r = run_cli("chat", "default", "--temperature", "0", "--max-new-tokens", "24", input=script)
    assert r.returncode == 0, r.stderr
    assert "(conversation cleared)" in r.stdout
    turns = [t.strip() for t in r.stdout.replace("(conversation cleared)", "").split(">>>")[1:]]
    # after each ">>>": answer 1, answer 2, (the /reset line prints above), answer 3, (/exit)
    assert len(turns) == 5 and turns[2] == "" and turns[4] == "", turns
    with_history, after_reset = turns[1], turns[3]
    fresh = run_cli("generate", "default", "-p", q, "--max-new-tokens", "24")
    assert fresh.returncode == 0, fresh.stderr
    assert after_reset == fresh.stdout.strip()
    assert with_history != after_reset
