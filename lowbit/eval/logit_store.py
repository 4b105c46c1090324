"""A reference model's token distributions saved once for `lowbit eval kld --reference FILE`:
a safetensors file holding, per scored position, the top-k log-probs (fp16, descending), their
token ids (int32), the log of the remaining mass (fp32) and the log-prob of the actual next token
(fp32, for the reference's perplexity), plus the token windows themselves (int32), so a later run
scores exactly the same tokens. About k * 6 + 8 bytes a token: 392 for k = 64, where full fp16
logits of a 49k vocabulary would take 98 KB.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError

FORMAT = "lowbit-kld-reference-v1"


def save(path, windows: torch.Tensor, rows: list[tuple], meta: dict) -> Path:
    """rows: (top_logp [n, k], top_idx [n, k], rest_logp [n], token_logp [n]) chunks, in window order."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "windows": windows.to(torch.int32).contiguous(),  # [n_windows, seqlen]
        "top_logp": torch.cat([r[0] for r in rows]).to(torch.float16).contiguous(),  # [tokens, k]
        "top_idx": torch.cat([r[1] for r in rows]).to(torch.int32).contiguous(),  # [tokens, k]
        "rest_logp": torch.cat([r[2] for r in rows]).float().contiguous(),  # [tokens]
        "token_logp": torch.cat([r[3] for r in rows]).float().contiguous(),  # [tokens]
    }
    expected = windows.shape[0] * (windows.shape[1] - 1)
    if tensors["top_logp"].shape[0] != expected:
        raise ValueError(f"{tensors['top_logp'].shape[0]} rows for {expected} scored positions")
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta)})
    tmp.replace(path)  # a partial file never looks complete
    return path


@dataclass
class SavedLogits:
    path: Path
    meta: dict
    windows: torch.Tensor  # int64 [n_windows, seqlen]
    top_logp: torch.Tensor
    top_idx: torch.Tensor
    rest_logp: torch.Tensor
    token_logp: torch.Tensor

    @property
    def k(self) -> int:
        return self.top_logp.shape[1]

    def rows(self, window: int, positions: slice):
        """The saved rows of one window's scored positions (a slice of 0 .. seqlen - 2)."""
        per = self.windows.shape[1] - 1
        start, stop, _ = positions.indices(per)
        a, b = window * per + start, window * per + stop
        return self.top_logp[a:b], self.top_idx[a:b], self.rest_logp[a:b], self.token_logp[a:b]


def is_saved_logits(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix != ".gguf"


def load(path) -> SavedLogits:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            if md.get("format") != FORMAT:
                raise LowbitError(f"{path}: not a saved reference ({FORMAT}); write one with "
                                  f"`lowbit eval kld MODEL --reference REF --save-logits {path.name}`")
            t = {k: f.get_tensor(k) for k in f.keys()}
    except LowbitError:
        raise
    except Exception as e:  # safetensors raises its own error types for a truncated/corrupt file
        raise LowbitError(f"{path}: cannot read saved reference logits ({e})") from None
    return SavedLogits(path, json.loads(md["meta"]), t["windows"].long(), t["top_logp"], t["top_idx"],
                       t["rest_logp"], t["token_logp"])
