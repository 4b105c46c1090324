"""Write an HF-style directory: config.json, sharded model.safetensors (+ index)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file

MAX_SHARD_BYTES = 2 << 30  # 2 GiB shards: peak memory while writing is one shard, not the model


def write_tensors(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict | None = None) -> int:
    """Streams (name, tensor) pairs into shards; returns the total tensor bytes. One shard is
    named model.safetensors; several get HF's model-0000i-of-0000n names and an index file."""
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0

    def flush():
        p = out / f"shard-{len(written):05d}.tmp"
        save_file(shard, str(p), metadata={"format": "pt", **(metadata or {})})
        written.append((p, list(shard)))

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > MAX_SHARD_BYTES:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = t.contiguous()
        shard_bytes += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(out / "model.safetensors")
        return total
    weight_map = {}
    for i, (p, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        p.rename(out / final)
        weight_map.update({n: final for n in names})
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return total


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
