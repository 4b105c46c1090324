"""The engine's KV cache: fixed-size blocks shared by all sequences, addressed through block
tables. The model sees the same two calls as `ContiguousKVCache` (`attention`, `advance`); the
model runner primes it with each step's `PagedAttentionMetadata` before the forward.

A step is one packed sequence of tokens (B=1): first the decode tokens, one per sequence,
which attend to their whole context through the paged decode kernel; then prompt chunks, which
attend causally to their earlier pages and to themselves. Both read the keys and values back
from the pages after writing them, so a chunk sees exactly what a later decode will see, also
with int8/int4 KV.

With kv_bits 8 or 4 the pages hold codes and a (scale, zero) pair per token and head, in the
format of `lowbit/kernels/kv_quant.py`: quantized on write, dequantized on read. On CUDA the
Triton kernels (`lowbit/kernels/kv_write.py`, `paged_attention.py`, `prefill_attention.py`) write
and attend; one that fails to import is an error with its cause, not a fall back to the PyTorch path
below (which is the CPU's).
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from lowbit.errors import LowbitError
from lowbit.kernels.kv_quant import dequantize_kv_ref, packed_head_dim, quantize_kv_ref
from lowbit.layers.attention import gqa_attention
from lowbit.layers.rotary import apply_rotary

SCALE_ZERO_BYTES = 2 * 2  # fp16 (scale, zero) per token and KV head, beside the codes
ROTATION_ENV = "LOWBIT_KV_ROTATION"  # auto (int4 KV) | 1 (int8 and int4) | 0 (never)


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two): symmetric, its own inverse."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def rotates(kv_bits: int, head_dim: int) -> bool:
    """Whether keys and values are stored in a Hadamard basis (see PagedKVCache.attention)."""
    mode = os.environ.get(ROTATION_ENV, "auto")
    if mode not in ("auto", "0", "1"):
        raise LowbitError(f"{ROTATION_ENV}={mode!r}: expected auto, 0 or 1")
    wanted = kv_bits == 4 if mode == "auto" else (mode == "1" and kv_bits != 16)
    return wanted and head_dim & (head_dim - 1) == 0


@dataclass
class PagedAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block id * block_size + offset) of each new token
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [S] int32: tokens in the cache once this step's are written
    num_decode: int  # the first num_decode sequences (and tokens) decode one token each
    query_lens: list[int]  # [S] new tokens per sequence, host side, for the prefill loop
    context_lens_host: list[int] | None  # [S] the same as context_lens, host side; None in a CUDA graph
    # [S - num_decode + 1] int32, on the device: where each prompt chunk's queries start among
    # the prefill tokens (what the prefill kernel takes); None where no kernel needs it
    prefill_cu_seqlens_q: torch.Tensor | None = None


@dataclass
class AttentionKernels:
    """The kernels the cache calls; None where it runs its PyTorch path (the CPU, or a test's choice)."""

    write_kv: Callable | None = None
    decode: Callable | None = None
    prefill: Callable | None = None
    # Both attention kernels take the host-side bound that sizes their grid without a device sync
    # (max_context_len, max_seqlen_q): part of their signature, passed wherever the host knows it.


def load_attention_kernels() -> AttentionKernels:
    """The Triton kernels, imported here rather than at the top: Triton is the optional `kernels`
    extra, so a CPU install has none, and only the CUDA path (or a test under TRITON_INTERPRET=1)
    asks for them. A kernel that fails to import is an error with its cause."""
    try:
        from lowbit.kernels.kv_write import write_kv
        from lowbit.kernels.paged_attention import paged_decode_attention
        from lowbit.kernels.prefill_attention import paged_prefill_attention
    except Exception as e:  # ImportError (no Triton), or a kernel module that breaks at import
        raise LowbitError(f"{kernel_import_failure(e)}; the paged KV cache needs its Triton kernels on the GPU: "
                          "install them (pip install 'lowbit[kernels]') or run on the CPU (--device cpu)") from e
    return AttentionKernels(write_kv=write_kv, decode=paged_decode_attention, prefill=paged_prefill_attention)


def kernel_import_failure(e: BaseException) -> str:
    """'lowbit.kernels.X failed to import (Error: message)', X being the kernel module that broke:
    the one named by the ImportError, else the innermost whose top level raised (kv_tile, say,
    when its `import triton` fails under kv_write)."""
    if isinstance(e, ImportError) and (e.name or "").startswith("lowbit.kernels."):
        module = e.name
    else:
        tops = [f.f_globals.get("__name__", "") for f, _ in traceback.walk_tb(e.__traceback__)
                if f.f_code.co_name == "<module>"]
        module = next((m for m in reversed(tops) if m.startswith("lowbit.kernels.")), "a lowbit.kernels module")
    return f"{module} failed to import ({type(e).__name__}: {e})"


def _block_run(meta: PagedAttentionMetadata, nb: int) -> slice | None:
    """slice(b, b + nb) when the first sequence's first nb blocks are b, b + 1, ... (as a fresh
    engine allocates them), else None; worked out once per step, for every layer."""
    key = ("_block_run", nb)
    if key not in meta.__dict__:
        t = meta.block_tables[0, :nb]
        b = int(t[0])
        contiguous = bool(torch.equal(t.long(), torch.arange(b, b + nb, dtype=torch.long, device=t.device)))
        meta.__dict__[key] = slice(b, b + nb) if contiguous else None
    return meta.__dict__[key]


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 kv_bits: int, dtype: torch.dtype, device: torch.device | str, use_kernels: bool | None = None):
        """use_kernels: None uses the Triton kernels on CUDA (where present) and PyTorch elsewhere."""
        if kv_bits not in (16, 8, 4):
            raise LowbitError(f"kv_bits={kv_bits}: expected 16, 8 or 4")
        if kv_bits == 4 and head_dim % 2:
            raise LowbitError(f"kv_bits=4 packs two dims per byte; head_dim {head_dim} is odd, use kv_bits=8")
        device = torch.device(device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_heads, self.head_dim, self.kv_bits = kv_heads, head_dim, kv_bits
        self.dtype = dtype
        quantized = kv_bits != 16
        width = packed_head_dim(head_dim, kv_bits) if quantized else head_dim
        shape = (num_blocks, block_size, kv_heads, width)  # [num_blocks, block_size, kv_heads, head_dim or packed]
        code_dtype = torch.uint8 if quantized else dtype

        def pages(shape_, dtype_):
            return [torch.zeros(shape_, dtype=dtype_, device=device) for _ in range(num_layers)]

        self.k, self.v = pages(shape, code_dtype), pages(shape, code_dtype)
        # [num_blocks, block_size, kv_heads, 2] fp16 (scale, zero) per token and head
        sz_shape = (num_blocks, block_size, kv_heads, 2)
        self.k_scale_zero = pages(sz_shape, torch.float16) if quantized else None
        self.v_scale_zero = pages(sz_shape, torch.float16) if quantized else None
        if use_kernels is None:
            use_kernels = device.type == "cuda"
        self.kernels = load_attention_kernels() if use_kernels else AttentionKernels()
        self.meta: PagedAttentionMetadata | None = None
        # int4 KV: a Hadamard rotation spreads a head's outlier channels over all of its dims, so the
        # per-token range each code must cover shrinks (ExLlamaV2's Q4 cache, QuaRot's online K rotation)
        self.rotation = hadamard(head_dim).to(device, dtype) if rotates(kv_bits, head_dim) else None

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, kv_bits: int, dtype: torch.dtype) -> int:
        """K and V of one token over all layers, as stored: codes plus their scale/zero for int8/int4."""
        if kv_bits == 16:
            per_head = head_dim * torch.finfo(dtype).bits // 8
        else:
            per_head = packed_head_dim(head_dim, kv_bits) + SCALE_ZERO_BYTES
        return 2 * num_layers * kv_heads * per_head

    @property
    def num_bytes(self) -> int:
        tensors = self.k + self.v + (self.k_scale_zero or []) + (self.v_scale_zero or [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def decode_is_graph_safe(self) -> bool:
        """The decode path has fixed shapes per batch size (no host-side lengths): the kernel's."""
        return self.kernels.decode is not None

    def set_metadata(self, meta: PagedAttentionMetadata) -> None:
        self.meta = meta

    def _scale_zero(self, layer: int) -> dict:
        if self.kv_bits == 16:
            return {}
        return {"k_scale_zero": self.k_scale_zero[layer], "v_scale_zero": self.v_scale_zero[layer]}

    # -- writing -----------------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, rope: tuple | None = None) -> None:
        """k, v [T, kv_heads, head_dim] into the slots of the step's tokens; rope = (q, cos, sin): the
        kernel applies the rotary embedding on the way (write_kv's `rope`; the kernel path only)."""
        slots = self.meta.slot_mapping
        if self.kernels.write_kv is not None:
            self.kernels.write_kv(k, v, self.k[layer], self.v[layer], slots, kv_bits=self.kv_bits, rope=rope,
                                  **self._scale_zero(layer))
            return
        assert rope is None, "the PyTorch write takes rotated keys (PagedKVCache.attention rotates them)"
        if self.kv_bits == 16:
            self._flat(self.k[layer]).index_copy_(0, slots, k.to(self.dtype))
            self._flat(self.v[layer]).index_copy_(0, slots, v.to(self.dtype))
            return
        for x, codes, sz in ((k, self.k[layer], self.k_scale_zero[layer]), (v, self.v[layer], self.v_scale_zero[layer])):
            q, s = quantize_kv_ref(x, self.kv_bits)
            self._flat(codes).index_copy_(0, slots, q)
            self._flat(sz).index_copy_(0, slots, s)

    def _flat(self, pages: torch.Tensor) -> torch.Tensor:
        return pages.view(-1, *pages.shape[2:])  # [num_blocks * block_size, kv_heads, ...]

    # -- reading (PyTorch path) --------------------------------------------------------------
    def _read(self, layer: int, blocks: torch.Tensor | slice, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks int64 [..., nb] -> keys and values [..., nb * block_size, kv_heads, head_dim] in dtype;
        a slice of block ids reads those adjacent blocks without a gather (a view of 16-bit pages)."""
        if isinstance(blocks, slice):
            lead = (blocks.stop - blocks.start,)
        else:
            lead = blocks.shape

        def take(t):  # t[blocks]: [..., nb, block_size, kv_heads, width]
            if isinstance(blocks, slice):
                return t[blocks]
            # index_select: the same gather at less than half of advanced indexing's cost on the CPU
            return t.index_select(0, blocks.reshape(-1)).view(*blocks.shape, *t.shape[1:])

        def pages(codes, sz):
            x = take(codes)
            if self.kv_bits != 16:
                x = dequantize_kv_ref(x, take(sz), self.kv_bits, dtype)
            return x.reshape(*lead[:-1], lead[-1] * self.block_size, self.kv_heads, self.head_dim).to(dtype)

        ksz = self.k_scale_zero[layer] if self.kv_bits != 16 else None
        vsz = self.v_scale_zero[layer] if self.kv_bits != 16 else None
        return pages(self.k[layer], ksz), pages(self.v[layer], vsz)

    def gather(self, layer: int, block_table: torch.Tensor, length: int,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first `length` keys and values -> [kv_heads, length, head_dim] each."""
        nb = -(-length // self.block_size)
        k, v = self._read(layer, block_table[:nb].long(), dtype or self.dtype)
        return k[:length].transpose(0, 1), v[:length].transpose(0, 1)

    def decode_attention(self, layer: int, q: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
        """q [S, H, D], one query per sequence at its last position -> [S, H, D]. The PyTorch path
        reads all S contexts at once, padded to the longest and masked by each context length."""
        m = self.meta
        s = q.shape[0]
        if self.kernels.decode is not None:
            hint = {}
            if m.context_lens_host is not None:  # None inside a CUDA graph
                hint["max_context_len"] = max(m.context_lens_host[:s])
            return self.kernels.decode(q, self.k[layer], self.v[layer], m.block_tables[:s], m.context_lens[:s],
                                       kv_bits=self.kv_bits, sliding_window=sliding_window, **self._scale_zero(layer),
                                       **hint)
        longest = max(m.context_lens_host[:s])
        nb = -(-longest // self.block_size)
        run = _block_run(m, nb) if s == 1 else None
        if run is not None:  # one sequence whose blocks lie in order: read them in place
            k, v = (x[None] for x in self._read(layer, run, q.dtype))
        else:
            k, v = self._read(layer, m.block_tables[:s, :nb].long(), q.dtype)  # [S, L, KVH, D]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [S, KVH, L, D]: SDPA shares each KV head (enable_gqa)
        if s == 1 and sliding_window is None:  # one sequence: its exact context, nothing to mask
            k, v, mask = k[:, :, :longest], v[:, :, :longest], None
        else:
            ctx = m.context_lens[:s].long()[:, None]
            pos = torch.arange(k.shape[2], device=q.device)[None, :]
            mask = pos < ctx  # [S, L]: the query sits at position ctx - 1
            if sliding_window is not None:
                mask &= pos >= ctx - sliding_window
            mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask,
                                             enable_gqa=q.shape[1] != self.kv_heads)
        return out[:, :, 0]

    def _attend(self, layer: int, q: torch.Tensor, i: int, sliding_window: int | None) -> torch.Tensor:
        """q [n, H, D], the last n positions of sequence i -> [H, n, D]."""
        m = self.meta
        k, v = self.gather(layer, m.block_tables[i], m.context_lens_host[i], q.dtype)
        return gqa_attention(q.transpose(0, 1)[None], k[None], v[None], sliding_window)[0]

    def prefill_attention(self, layer: int, q: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
        """q [T, H, D]: the prompt chunks after the decodes, each its sequence's last positions -> [T, H, D]."""
        m = self.meta
        nd = m.num_decode
        if self.kernels.prefill is not None and m.prefill_cu_seqlens_q is not None:
            return self.kernels.prefill(q, self.k[layer], self.v[layer], m.block_tables[nd:], m.prefill_cu_seqlens_q,
                                        m.context_lens[nd:], kv_bits=self.kv_bits, sliding_window=sliding_window,
                                        **self._scale_zero(layer), max_seqlen_q=max(m.query_lens[nd:]))
        out = torch.empty_like(q)
        start = 0
        for i in range(nd, len(m.query_lens)):
            n = m.query_lens[i]
            out[start:start + n] = self._attend(layer, q[start:start + n], i, sliding_window).transpose(0, 1)
            start += n
        return out

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
        """q [1, T, H, D], new k/v [1, T, KVH, D] before the rotary embedding (cos, sin [1, T, D])
        -> [1, T, H, D]."""
        m = self.meta
        if self.rotation is None and self.kernels.write_kv is not None:
            # one kernel: q rotated in place, k rotated as it is stored (the rotary's own launch saved)
            q = q[0]
            self.write(layer, k[0], v[0], rope=(q, cos[0], sin[0]))
        else:
            q, k = apply_rotary(q, k, cos, sin)
            q, k, v = q[0], k[0], v[0]  # [T, heads, D]
            if self.rotation is not None:  # q.k and softmax(.)v are unchanged in an orthonormal basis
                q, k, v = q @ self.rotation, k @ self.rotation, v @ self.rotation
            self.write(layer, k, v)
        nd = m.num_decode
        if nd == len(m.query_lens):  # decode only: no copy, and fixed shapes for CUDA graphs
            out = self.decode_attention(layer, q, sliding_window)
        elif nd == 0:
            out = self.prefill_attention(layer, q, sliding_window)
        else:
            out = torch.cat([self.decode_attention(layer, q[:nd], sliding_window),
                             self.prefill_attention(layer, q[nd:], sliding_window)])
        if self.rotation is not None:  # back from the Hadamard basis (the matrix is its own inverse)
            out = out @ self.rotation
        return out[None]

    def advance(self, t: int) -> None:
        """Positions come from the metadata; nothing to count here."""
