"""`lowbit convert`: output loads in transformers with the same logits; interruptions leave nothing complete."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli


def test_convert_writes_standard_hf_dir(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert not any(n.startswith(".") for n in names)
    tcfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"]


def test_transformers_loads_converted_dir_with_same_logits(converted, smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, _ = smol
    hf = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(converted))
    chat = [{"role": "user", "content": "Name three primary colors."}]
    ids = tok.encode_chat(chat)
    hf_ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
    assert list(hf_ids) == ids
    with torch.no_grad():
        diff = (hf(torch.tensor([ids])).logits - model(torch.tensor([ids]))).abs().max().item()
    assert diff < 1e-4


def test_our_loader_reads_converted_dir(converted, smol):
    from lowbit.loading.loader import load_model

    model, tok, _ = smol
    again, tok2, _ = load_model(converted, "fp32", "cpu")
    ids = torch.tensor([tok.encode("Hello world, this is a test.")])
    assert tok2.encode("Hello world, this is a test.") == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_existing_output_is_refused(converted, gguf_path):
    r = run_cli("convert", str(gguf_path), str(converted))
    assert r.returncode == 2
    assert "already exists" in r.stderr and "Traceback" not in r.stderr


def test_interrupted_convert_leaves_no_complete_looking_dir(tmp_path, gguf_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "convert", str(gguf_path), str(out),
                             "--dtype", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # kill it once the partial directory is being written
    while time.time() < deadline and not any(p.name.startswith(".killed.partial") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert all(p.name.startswith(".") for p in tmp_path.iterdir())
