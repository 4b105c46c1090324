"""Bad input gets one clear line and exit status 2, never a traceback."""
import json
import shutil

import pytest

from conftest import run_cli


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in err, err


def test_missing_path(tmp_path):
    _assert_clean_error(run_cli("generate", str(tmp_path / "nope"), "-p", "hi"), "nope", "no such file")


def test_directory_without_config(tmp_path):
    _assert_clean_error(run_cli("generate", str(tmp_path), "-p", "hi"), "no config.json")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _assert_clean_error(run_cli("generate", str(tmp_path), "-p", "hi"), "GPT2LMHeadModel", "unsupported")


def test_truncated_gguf(tmp_path, gguf_path):
    bad = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        bad.write_bytes(f.read(20_000_000))
    _assert_clean_error(run_cli("generate", str(bad), "-p", "hi"), "truncated.gguf")


def test_corrupt_gguf_header(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"NOTAGGUF" + bytes(range(256)) * 10)
    _assert_clean_error(run_cli("convert", str(bad), str(tmp_path / "out")), "garbage.gguf")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tmp_path, converted):
    bad = tmp_path / "bad"
    shutil.copytree(converted, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    _assert_clean_error(run_cli("generate", str(bad), "-p", "hi"), "model.safetensors")


def test_bad_dtype(tmp_path, gguf_path):
    _assert_clean_error(run_cli("convert", str(gguf_path), str(tmp_path / "o"), "--dtype", "int3"), "--dtype")


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "generate", str(tmp_path / "nope"), "-p", "hi")
    assert r.returncode != 0 and "Traceback" in r.stderr
