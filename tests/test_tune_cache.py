"""The tuner's on-disk cache: a choice stored by one process is found by the next (as the same
candidate object), only while it is still a candidate; a broken file is retuned, not fatal; the
file is per GPU model, versions and kernel source; LOWBIT_TUNE_CACHE=0 turns it off."""
import json

from lowbit.kernels import tune_cache
from lowbit.kernels.w4a16 import Config

KEY = ("w4a16", 16, 4096, 4096, 4, "torch.float16", "torch.float16")
CANDS = [Config("mmt", 16, 64, 1, 2, 4, 3), Config("mmc", 64, 256, 2, 5, 8, 1)]


def test_a_stored_choice_is_found_by_the_next_process(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_TUNE_CACHE", str(tmp_path))
    path = tune_cache.cache_file("NVIDIA H100 80GB HBM3", "torch2.11-triton3.6")
    assert path.parent == tmp_path and tune_cache.sources_hash() in path.name and " " not in path.name
    assert tune_cache.lookup(path, KEY, CANDS) is None
    tune_cache.store(path, KEY, CANDS[1])
    tune_cache.store(path, ("other",), CANDS[0])
    fresh = [Config(*c) for c in CANDS]  # another process builds its own candidate objects
    assert tune_cache.lookup(path, KEY, fresh) is fresh[1]
    assert tune_cache.lookup(path, ("other",), fresh) is fresh[0]
    # no longer a candidate (the list changed): retuned
    assert tune_cache.lookup(path, KEY, fresh[:1]) is None
    assert sorted(json.loads(path.read_text())) == sorted([repr(KEY), repr(("other",))])
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_broken_file_is_ignored_and_rewritten(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LOWBIT_TUNE_CACHE", str(tmp_path))
    path = tune_cache.cache_file("gpu", "v")
    path.write_text("{not json")
    assert tune_cache.lookup(path, KEY, CANDS) is None and "unreadable" in caplog.text
    tune_cache.store(path, KEY, CANDS[0])
    assert tune_cache.lookup(path, KEY, CANDS) is CANDS[0]


def test_off_and_other_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_TUNE_CACHE", "0")
    assert tune_cache.cache_file("gpu", "v") is None and tune_cache.lookup(None, KEY, CANDS) is None
    tune_cache.store(None, KEY, CANDS[0])  # a no-op
    monkeypatch.setenv("LOWBIT_TUNE_CACHE", str(tmp_path))
    assert tune_cache.cache_file("NVIDIA H100", "v") != tune_cache.cache_file("NVIDIA H200", "v")
