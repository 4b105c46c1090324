"""Dummy weights: the (model, tokenizer, checkpoint) triple `LLM` takes, with random weights of a
named shape (`lowbit/models/presets.py`) made directly on the device: no file, no copy through the
host. A loader like load_model (vLLM's DummyModelLoader sits beside its real loaders too).

W4A16 weights go the way a quantized checkpoint goes: random codes, scales and zeros (what a
quantizer returns) are packed into AutoAWQ's GEMM tensors and handed to the `awq` LinearMethod,
which unpacks them for its kernel exactly as after loading a checkpoint. W8A8 (w_bits 8) fills a
compressed-tensors int8 layer's tensors (int8 weights, per-channel scales, per-token activations).
"""
from __future__ import annotations

import time
import zlib

import torch
from torch import nn

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError
from lowbit.formats import awq_format
from lowbit.formats.compressed_tensors import W8A8Scheme
from lowbit.layers.formats import method_for_checkpoint
from lowbit.layers.norm import RMSNorm
from lowbit.layers.w8a8_linear import W8A8LinearMethod
from lowbit.loading.loader import default_device, parse_dtype
from lowbit.models.llama import LlamaModel
from lowbit.models.presets import preset_config

W_BITS = (16, 8, 4)
W8A8_INT = W8A8Scheme("int", "channel", True)  # compressed-tensors int8: channel weights, dynamic tokens
INIT_STD = 0.02  # HF's initializer_range: activations stay finite through 80 fp16 layers


class DummyTokenizer:
    """Dummy weights have no vocabulary: prompts are token ids, and text is the ids written out."""

    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise LowbitError("dummy weights have no tokenizer: give prompts as token ids")

    def encode_chat(self, messages, tools=None) -> list[int]:
        return self.encode("")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)

    def stop_token_ids(self, extra=None) -> set[int]:
        return set()


class DummyCheckpoint:
    """What `LLM` reads from a checkpoint besides the weights."""

    def __init__(self, config: ModelConfig, arch: str, w_bits: int, group_size: int):
        self.config = config
        self.source = f"dummy:{arch}"
        self.quant = None
        if w_bits == 4:
            self.quant = {"quant_method": "awq", "bits": w_bits, "group_size": group_size, "version": "gemm",
                          "zero_point": True}
        elif w_bits == 8:
            self.quant = {"quant_method": "compressed-tensors", "format": "int-quantized"}

    def generation_config(self) -> dict:
        return {}


def _w4_method_for(group_size: int):
    return method_for_checkpoint({"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm"},
                                 "dummy weights")


@torch.no_grad()
def _fill_quantized(layer, gen: torch.Generator) -> None:
    """Random 4-bit codes around a zero of 8, scaled so the weights have std ~INIT_STD."""
    out_f, in_f = layer.out_features, layer.in_features
    n_groups = layer.scales.shape[0]
    dev = layer.scales.device
    codes = torch.randint(0, 16, (out_f, in_f), generator=gen, device=dev, dtype=torch.uint8)
    zeros = torch.full((out_f, n_groups), 8, dtype=torch.int32, device=dev)
    scales = torch.full((out_f, n_groups), INIT_STD / 4.6, device=dev)  # std of code - 8 is 4.6
    for name, t in awq_format.pack(codes, scales, zeros).items():
        getattr(layer, name).copy_(t)
    del codes
    layer.method.after_load(layer)


@torch.no_grad()
def _fill_w8a8(layer, gen: torch.Generator) -> None:
    """Random int8 weights with per-channel scales giving std ~INIT_STD (uniform codes: std ~73)."""
    dev = layer.weight.device
    layer.weight.copy_(torch.randint(-127, 128, layer.weight.shape, generator=gen, device=dev, dtype=torch.int8))
    layer.weight_scale.fill_(INIT_STD / 73.3)
    layer.method.after_load(layer)


@torch.no_grad()
def build_dummy_model(arch: str, w_bits: int = 16, group_size: int = 128, dtype: str | torch.dtype = "auto",
                      device: str | torch.device | None = None, seed: int = 0, shard: tuple[int, int] | None = None):
    """-> (model, tokenizer, checkpoint), the triple `LLM` takes, with random weights of `arch`'s
    shapes made on `device`: fp16/bf16/fp32 (w_bits 16), W8A8 int8 (w_bits 8) or AWQ W4A16 (w_bits 4,
    `group_size`). shard = (rank, world): only that tensor-parallel rank's part, made a layer at a
    time (LlamaModel.build_shard); each layer's weights come from a generator seeded by its name,
    so every rank's part is the same as the whole model's."""
    cfg = preset_config(arch)
    if w_bits not in W_BITS:
        raise LowbitError(f"--w-bits {w_bits}: dummy weights are 16 (dense), 8 (W8A8 int8) or 4 (AWQ W4A16)")
    device = torch.device(device) if device else default_device()
    if dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    dtype = parse_dtype(dtype)
    method_for = {4: _w4_method_for(group_size), 8: lambda n, _i, _o: W8A8LinearMethod(W8A8_INT, n)}.get(
        w_bits, lambda _n, _i, _o: None)
    if w_bits == 4:
        bad = [n for n in (cfg.hidden_size, cfg.intermediate_size) if n % group_size]
        if group_size != -1 and bad:
            raise LowbitError(f"--group-size {group_size} does not divide {bad[0]} (a linear input of {arch}); "
                              "pick one that divides it, e.g. 64 or 128")

    def fill(root: nn.Module, prefix: str) -> None:
        """Random weights for `root`, the decoder layer `prefix` names (or, for "", the rest of the
        model: embeddings, final norm, output head)."""
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(prefix.encode()))
        mine = [m for n, m in root.named_modules() if prefix or not n.startswith("model.layers")]
        for module in mine:
            for name, p in module.named_parameters(recurse=False):
                if name == "weight" and isinstance(module, RMSNorm):
                    p.fill_(1.0)
                elif name == "bias":
                    p.zero_()
                else:
                    p.normal_(0.0, INIT_STD, generator=gen)
        if w_bits != 16:
            fill_packed = _fill_quantized if w_bits == 4 else _fill_w8a8
            for module in mine:
                if getattr(module, "method", None) is not None and module.method.name != "dense":
                    fill_packed(module, gen)

    if shard is not None:
        model = LlamaModel.build_shard(cfg, method_for, dtype, True, device, *shard, fill)
    else:
        with torch.device(device):
            model = LlamaModel(cfg, method_for, dtype)
        fill(model, "")
        for i, layer in enumerate(model.layers):
            fill(layer, f"model.layers.{i}.")
    ckpt = DummyCheckpoint(cfg, arch, w_bits, group_size)
    ckpt.recipe = (arch, w_bits, group_size, dtype, seed)  # what rebuilds the same weights elsewhere
    return model.eval(), DummyTokenizer(cfg.vocab_size), ckpt


def build_timed(arch: str, w_bits: int = 16, group_size: int = 128, dtype="auto", device=None, seed: int = 0):
    """build_dummy_model plus what building cost: seconds, and on CUDA the bytes it holds and peaked at."""
    dev = torch.device(device) if device else None
    cuda = (dev or torch.device("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    triple = build_dummy_model(arch, w_bits, group_size, dtype, device, seed)
    stats = {"build_s": None, "allocated_bytes": None, "peak_bytes": None}
    if cuda:
        torch.cuda.synchronize()
        stats["allocated_bytes"] = torch.cuda.memory_allocated() - before
        stats["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    stats["build_s"] = time.perf_counter() - t0
    return triple, stats
