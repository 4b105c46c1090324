"""Open any supported checkpoint and build our model from it, one tensor at a time."""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.loading.checkpoint import Checkpoint
from lowbit.models.llama import MERGED, LlamaModel

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise LowbitError(f"--dtype {name!r}: expected one of fp32, fp16, bf16")
    return DTYPES[name]


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise LowbitError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise LowbitError(f"{path}: expected a .gguf file or an HF model directory")
        from lowbit.loading.gguf_file import GGUFFile

        return GGUFFile(path)
    from lowbit.loading.safetensors_dir import SafetensorsDir

    ckpt = SafetensorsDir(path)
    if ckpt.config.family == "internlm2":
        from lowbit.loading.internlm2 import InternLM2Names

        return InternLM2Names(ckpt)
    return ckpt


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device | str = "cpu",
                fused: bool = True, shard: tuple[int, int] | None = None) -> LlamaModel:
    """fused: q/k/v and gate/up as one merged linear each (inference); quantizers pass False.
    shard = (rank, world): only that rank's tensor-parallel shard, read one layer at a time
    (LlamaModel.build_shard)."""
    from lowbit.layers.formats import method_for_checkpoint

    method_for = method_for_checkpoint(ckpt.quant, ckpt.source)
    fused = fused and _g_idx_shared(ckpt) and _settings_shared(ckpt, method_for)
    if shard is not None:
        return LlamaModel.build_shard(ckpt.config, method_for, dtype, fused, device, *shard,
                                      lambda module, prefix: load_weights(module, ckpt, prefix))
    with torch.device(device):
        model = LlamaModel(ckpt.config, method_for, dtype, fused)
    load_weights(model, ckpt)
    return model.eval()


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, prefix: str = "") -> None:
    """Copy each checkpoint tensor into the parameter of the same name (prefix + its name in
    `model`: a decoder layer is "model.layers.N."); float tensors take the model's dtype, integer
    ones (packed codes) stay as stored. A merged linear's tensor is its shards' tensors
    concatenated along the format's output dim."""
    for local, param in model.state_dict(keep_vars=True).items():
        owner, _, leaf = local.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        shards = getattr(module, "shards", None)
        name = prefix + local
        t = _merged(ckpt, prefix + owner, leaf, shards, module.method) if shards else ckpt.get(name)
        if tuple(t.shape) != tuple(param.shape):
            basis = "config.json and its quantization_config" if ckpt.quant else "config.json"
            raise LowbitError(f"{_file_of(ckpt, name)}: tensor {name!r} has shape {tuple(t.shape)}, "
                              f"expected {tuple(param.shape)} from {basis}")
        param.data.copy_(t)
    for module in model.modules():
        if hasattr(module, "method"):
            module.method.after_load(module)


def _g_idx_shared(ckpt: Checkpoint) -> bool:
    """Whether projections that would be merged hold equal act-order g_idx (or none), so that one
    column order serves them all. GPTQ computes them from the same inputs, so they normally agree;
    a checkpoint where they do not runs its projections unmerged."""
    if not (ckpt.quant or {}).get("desc_act"):
        return True
    for i in range(ckpt.config.num_hidden_layers):
        for block, names in MERGED:
            found = [f"model.layers.{i}.{block}.{n}.g_idx" for n in names]
            if not all(ckpt.has(n) for n in found):  # no g_idx stored (or a skipped projection)
                continue
            first, *rest = (ckpt.get(n) for n in found)
            if any(not torch.equal(first, r) for r in rest):
                return False
    return True


def _settings_shared(ckpt: Checkpoint, method_for) -> bool:
    """Whether projections that would be merged share one weight setting: a mixed-precision
    checkpoint (per-module `dynamic` bits / group sizes) may give q and k different bits, whose
    packed tensors cannot be concatenated; such a checkpoint runs its projections unmerged."""
    if not (ckpt.quant or {}).get("dynamic"):
        return True
    for i in range(ckpt.config.num_hidden_layers):
        for block, names in MERGED:
            methods = [method_for(f"model.layers.{i}.{block}.{n}", 0, 0) for n in names]
            if len({(getattr(m, "name", "dense"), getattr(m, "bits", None), getattr(m, "group_size", None))
                    for m in methods}) > 1:
                return False
    return True


def _merged(ckpt: Checkpoint, owner: str, leaf: str, shards, method) -> torch.Tensor:
    """owner = "model.layers.0.self_attn.qkv_proj", leaf = "qweight" -> the q/k/v tensors joined."""
    parent = owner.rpartition(".")[0]
    names = [f"{parent}.{shard}.{leaf}" for shard, _ in shards]
    parts = [ckpt.get(n) for n in names]
    dim = 0 if leaf == "bias" else method.output_dim(leaf)
    if dim is None:  # shared by every output (g_idx): the shards must agree
        for n, p in zip(names[1:], parts[1:]):
            if not torch.equal(p, parts[0]):
                raise LowbitError(f"{_file_of(ckpt, n)}: {n} differs from {names[0]}, so the projections of "
                                  f"{parent} cannot run as one merged matmul; lowbit needs them equal "
                                  f"(GPTQ act-order computed from the same inputs gives equal g_idx)")
        return parts[0]
    for n, p in zip(names, parts):
        if p.dim() <= dim:
            raise LowbitError(f"{_file_of(ckpt, n)}: tensor {n!r} has shape {tuple(p.shape)}; expected at least "
                              f"{dim + 1} dims")
    return torch.cat(parts, dim)


def _file_of(ckpt: Checkpoint, name: str) -> str:
    """The shard a tensor came from, where the reader knows it (a safetensors dir), else the checkpoint."""
    return str(getattr(ckpt, "_where", {}).get(name, ckpt.source))


def load_model(path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
               shard: tuple[int, int] | None = None):
    """Returns (model, tokenizer, checkpoint) for a .gguf file or an HF / quantized directory.
    dtype "auto" computes in fp16 on a GPU and fp32 on the CPU (where fp16 matmuls are slow);
    shard = (rank, world) builds only that tensor-parallel rank's part."""
    ckpt = open_checkpoint(path)
    device = torch.device(device) if device else default_device()
    if dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_model(ckpt, parse_dtype(dtype), device, shard=shard)
    return model, ckpt.tokenizer(), ckpt
