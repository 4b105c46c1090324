"""What every `lowbit bench` measurement shares: the model under test (a checkpoint or dummy
weights of a named shape), the record of where and how it ran, percentiles, and the JSON file."""
from __future__ import annotations

import datetime
import json
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError


@dataclass
class ModelSpec:
    """Which weights to run: `model` (a path or `default`), or dummy weights of `arch`'s shapes."""

    model: str = "default"
    dummy_weights: bool = False
    arch: str | None = None
    w_bits: int = 16  # dummy weights: 16 (dense), 8 (W8A8 int8) or 4 (AWQ W4A16)
    group_size: int = 128
    dtype: str = "auto"
    device: str | None = None

    def describe(self, model=None) -> str:
        """The weights in a few words; with the loaded model, its dense dtype as it runs."""
        dtype = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(
            str(model.model.embed_tokens.weight.dtype) if model is not None else "", self.dtype)
        if self.dummy_weights:
            if self.w_bits == 8:
                return f"{self.arch} dummy W8A8 int8"
            return f"{self.arch} dummy " + (dtype if self.w_bits == 16 else f"W{self.w_bits}A16 g{self.group_size}")
        return self.model if model is None else f"{self.model} ({dtype})"

    def load(self, tp: int = 1):
        """-> (model, tokenizer, checkpoint), the triple LLM takes; with tp > 1 rank 0's shard only
        (LLM's other ranks build theirs: no GPU ever holds the whole model)."""
        shard = (0, tp) if tp > 1 else None
        if self.dummy_weights:
            from lowbit.loading.dummy import build_dummy_model

            if not self.arch:
                raise LowbitError("--dummy-weights needs --arch (tiny, llama2-7b, llama3-8b, llama2-70b)")
            return build_dummy_model(self.arch, self.w_bits, self.group_size, self.dtype, self.device, shard=shard)
        if self.w_bits != 16:
            raise LowbitError(f"--w-bits {self.w_bits} applies to --dummy-weights; a checkpoint's weights are "
                              "what it stores (quantize it first with `lowbit quantize`)")
        from lowbit.loading.loader import load_model
        from lowbit.models.default import resolve_model

        return load_model(resolve_model(self.model), self.dtype, self.device, shard=shard)


def device_of(model) -> torch.device:
    return model.model.embed_tokens.weight.device


def environment(device: torch.device) -> dict:
    """Where and how the numbers were taken."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"device": str(device), "device_name": _cpu_name(),
           "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
           "python": platform.python_version(), "command": " ".join(sys.argv),
           "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_memory_bytes=props.total_memory)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentiles(values: list[float], scale: float = 1.0) -> dict:
    """p50 / p90 / p99 and mean of values (times scale); None when there are none."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    t = torch.tensor(values, dtype=torch.float64) * scale
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"p50": q[0], "p90": q[1], "p99": q[2], "mean": float(t.mean()), "n": len(values)}


def cuda_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def write_json(out_dir: Path, name: str, record: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(x):
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    if isinstance(x, (torch.device, torch.dtype, Path)):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def release_memory() -> None:
    """Returns what dropped engines held (their caches, CUDA graph pools) before the next is built."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def module_bytes(model) -> int:
    """Bytes of every parameter and buffer the model holds (packed and unpacked forms alike)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
