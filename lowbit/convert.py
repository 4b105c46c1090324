"""`lowbit convert`: any checkpoint we read -> a standard HF directory transformers loads."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from lowbit.atomic_dir import atomic_output_dir, check_output_dir
from lowbit.errors import LowbitError
from lowbit.loading.hf_writer import write_json, write_tensors
from lowbit.loading.loader import open_checkpoint, parse_dtype

_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def convert(src: str | Path, out_dir: str | Path, dtype: str = "fp16", overwrite: bool = False,
            progress: bool = True) -> Path:
    torch_dtype = parse_dtype(dtype)
    check_output_dir(out_dir, overwrite)  # before reading the checkpoint: a taken path costs nothing
    ckpt = open_checkpoint(src)
    if ckpt.quant:
        raise LowbitError(f"{src}: already quantized ({ckpt.quant.get('quant_method')}); convert reads dense checkpoints")
    cfg = ckpt.config
    names = _llama_names(cfg)
    tokenizer = ckpt.tokenizer()  # read before writing anything, so a bad tokenizer fails early
    with atomic_output_dir(out_dir, overwrite) as tmp:
        tensors = ((n, ckpt.get(n).to(torch_dtype)) for n in tqdm(names, desc="convert", unit="tensor",
                                                                   disable=not progress))
        write_tensors(tmp, tensors)
        hf = cfg.to_hf()
        hf.update(architectures=["LlamaForCausalLM"] if cfg.family == "internlm2" else [cfg.architecture],
                  model_type="llama" if cfg.family == "internlm2" else cfg.family,
                  torch_dtype=_DTYPE_NAMES[_short(dtype)])
        write_json(tmp / "config.json", hf)
        gen = {k: v for k, v in ckpt.generation_config().items() if v is not None}
        gen.setdefault("bos_token_id", tokenizer.bos_token_id)
        gen.setdefault("eos_token_id", tokenizer.eos_token_id)
        write_json(tmp / "generation_config.json", gen)
        tokenizer.save(tmp)
    return Path(out_dir)


def _short(dtype: str) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)


def _llama_names(cfg) -> list[str]:
    from lowbit.models.llama import LlamaModel
    import torch

    with torch.device("meta"):
        return list(LlamaModel(cfg, fused=False).state_dict().keys())  # the HF names, one per projection
