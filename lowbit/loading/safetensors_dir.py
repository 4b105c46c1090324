"""HF-style model directories: config.json, one or many *.safetensors (with the index), tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError
from lowbit.loading.checkpoint import Checkpoint


class SafetensorsDir(Checkpoint):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.source = str(self.path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise LowbitError(f"{self.path}: no config.json; expected an HF model directory or a .gguf file")
        self.hf_config = _read_json(cfg_path)
        self.config = ModelConfig.from_hf(self.hf_config, source=str(cfg_path))
        self.quant = self.hf_config.get("quantization_config")
        self._handles: dict[Path, object] = {}
        self._where = self._index()  # tensor name -> shard file

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise LowbitError(f"{index}: no 'weight_map' object")
            return {name: self.path / shard for name, shard in weight_map.items()}
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise LowbitError(f"{self.path}: no *.safetensors files (pytorch .bin checkpoints are not read; "
                              f"convert them with transformers' save_pretrained(safe_serialization=True))")
        where = {}
        for shard in shards:
            for name in self._open(shard).keys():
                where[name] = shard
        return where

    def _open(self, shard: Path):
        if shard not in self._handles:
            if not shard.is_file():
                raise LowbitError(f"{shard}: listed in the index but missing")
            try:
                self._handles[shard] = safe_open(str(shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise LowbitError(f"{shard}: not a readable safetensors file ({e})") from None
        return self._handles[shard]

    def names(self):
        return self._where.keys()

    def has(self, name):
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise LowbitError(f"{self.path}: tensor {name!r} missing from the checkpoint")
        shard = self._where[name]
        try:
            return self._open(shard).get_tensor(name)
        except LowbitError:
            raise
        except Exception as e:
            raise LowbitError(f"{shard}: tensor {name!r} could not be read ({e}); the file may be truncated") from None

    def tokenizer(self):
        from lowbit.loading.tokenizer import Tokenizer

        return Tokenizer.from_dir(self.path)

    def generation_config(self) -> dict:
        p = self.path / "generation_config.json"
        return _read_json(p) if p.is_file() else {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LowbitError(f"{path}: not valid JSON ({e})") from None
