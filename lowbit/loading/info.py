"""`lowbit info MODEL`: what a checkpoint is and what it costs on disk, read from headers only
(config.json, safetensors headers, GGUF metadata); no tensor is loaded. And which kernels its
layers would run on this machine (`lowbit/layers/kernel_report.py`)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.layers.kernel_report import format_kernels, planned_kernels
from lowbit.loading.loader import default_device, open_checkpoint

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelInfo:
    path: str
    architecture: str
    num_layers: int
    hidden_size: int
    params: int  # of the dense model this checkpoint represents (quantized linears counted as in x out)
    format: str  # dense | gguf | awq | gptq
    tensor_dtypes: dict[str, int]  # stored dtype -> number of tensors
    disk_bytes: int  # every file of the checkpoint
    weight_bytes: int  # the tensor files only (*.safetensors / .gguf)
    bytes_per_param: float  # weight_bytes / params
    linears: int  # decoder projections (q/k/v/o/gate/up/down of every layer)
    quantized_linears: int = 0
    bits: int | None = None
    group_size: int | None = None
    zero_point: bool | None = None  # awq
    version: str | None = None  # awq layout
    desc_act: bool | None = None  # gptq
    sym: bool | None = None  # gptq
    checkpoint_format: str | None = None  # gptq
    scheme: str | None = None  # compressed-tensors: what its config groups hold (int8 / fp8 W8A8)
    quantized_by: dict = field(default_factory=dict)  # the options lowbit quantize ran with, if it wrote it
    # awq / gptq: bits per weight of the decoder linears (codes, fp16 scales, zeros; dense ones at 16)
    linear_bpw: float | None = None
    # per-module overrides (gptq `dynamic`, written by quantize mixed): linear -> "4b g64" / "fp16"
    bit_map: dict = field(default_factory=dict)
    # what `lowbit eval report` measured and wrote into the checkpoint directory (eval_results.json)
    eval_results: dict = field(default_factory=dict)
    device: str = "cpu"  # where it would run: the GPU when there is one
    kernels: dict = field(default_factory=dict)  # role -> implementation there (kernel_report.planned_kernels)

    def to_dict(self) -> dict:
        return asdict(self)


def _dense_params(cfg) -> int:
    from lowbit.models.llama import LlamaModel

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaModel(cfg).parameters())


def _tensor_dtypes(ckpt, weight_files: list[Path]) -> Counter:
    if getattr(ckpt, "reader", None) is not None:  # GGUF: the ggml type of each tensor (Q4_1, F32, ...)
        return Counter(t.tensor_type.name for t in ckpt.reader.tensors)
    from safetensors import safe_open

    counts: Counter = Counter()
    for shard in weight_files:
        with safe_open(str(shard), framework="pt") as f:
            counts.update(f.get_slice(k).get_dtype() for k in f.keys())
    return counts


def model_info(path: str | Path, device: str | torch.device | None = None) -> ModelInfo:
    path = Path(path)
    device = torch.device(device) if device else default_device()
    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    weight_files = [p for p in files if p.suffix in (".safetensors", ".gguf")]
    disk, weights = sum(p.stat().st_size for p in files), sum(p.stat().st_size for p in weight_files)
    params = _dense_params(cfg)
    dtypes = _tensor_dtypes(ckpt, weight_files)
    quant = ckpt.quant or {}
    kind = str(quant.get("quant_method", "")).lower() or ("gguf" if path.is_file() else "dense")
    info = ModelInfo(path=str(path), architecture=cfg.architecture, num_layers=cfg.num_hidden_layers,
                     hidden_size=cfg.hidden_size, params=params, format=kind, tensor_dtypes=dict(dtypes),
                     disk_bytes=disk, weight_bytes=weights, bytes_per_param=weights / params,
                     linears=cfg.num_hidden_layers * len(LINEAR_SUFFIXES),
                     quantized_linears=sum(1 for n in ckpt.names() if n.endswith((".qweight", ".weight_scale"))))
    if quant:
        info.bits = quant.get("bits", quant.get("w_bit"))
        info.group_size = quant.get("group_size", quant.get("q_group_size"))
        info.quantized_by = quant.get("lowbit") or {}
        if kind == "awq":
            info.zero_point = bool(quant.get("zero_point", True))
            info.version = str(quant.get("version", quant.get("format", "gemm"))).lower()
        elif kind == "gptq":
            info.desc_act = bool(quant.get("desc_act", False))
            info.sym = bool(quant.get("sym", True))
            info.checkpoint_format = str(quant.get("checkpoint_format", quant.get("format", "gptq"))).lower()
        elif kind == "compressed-tensors":
            from lowbit.formats.compressed_tensors import method_options

            scheme = method_options(quant, f"{path}: quantization_config")("model.layers.0.self_attn.q_proj")
            info.scheme = scheme.describe() if scheme else None
            info.bits = 8 if scheme else None
    if kind in ("awq", "gptq"):
        info.linear_bpw, bit_map = _linear_bits(cfg, quant, str(path))
        info.bit_map = bit_map if quant.get("dynamic") else {}
    results = path / "eval_results.json" if path.is_dir() else None
    if results is not None and results.is_file():
        try:
            info.eval_results = json.loads(results.read_text())
        except ValueError as e:
            raise LowbitError(f"{results}: not readable JSON ({e}); rerun `lowbit eval report` or delete it") from None
    info.device = str(device)
    layer_format = kind if kind != "compressed-tensors" else ("fp8" if info.scheme and "fp8" in info.scheme else "w8a8")
    info.kernels = planned_kernels(layer_format, info.bits, device)
    return info


def _linear_bits(cfg, quant: dict, source: str) -> tuple[float, dict[str, str]]:
    """(bits per weight over the decoder linears, linear -> its setting), from the config alone: each
    linear's method as the loader would build it, its size counted as gptq_format.bits_on_disk."""
    from lowbit.formats.gptq_format import bits_on_disk
    from lowbit.layers.formats import method_for_checkpoint
    from lowbit.layers.linear import QLinear
    from lowbit.models.llama import LlamaModel

    method_for = method_for_checkpoint(quant, source)
    with torch.device("meta"):
        net = LlamaModel(cfg, fused=False)
    total = numel = 0
    settings = {}
    for name, m in net.named_modules():
        if not isinstance(m, QLinear) or ".layers." not in name:
            continue
        method = method_for(name, m.in_features, m.out_features)
        n = m.in_features * m.out_features
        if method is None:
            settings[name], bits = "fp16", 16 * n
        else:
            settings[name] = f"{method.bits}b g{method.group_size}"
            bits = bits_on_disk(m.in_features, m.out_features, method.bits, method.group_size)
        total, numel = total + bits, numel + n
    return total / numel, settings


def format_bit_map(bit_map: dict[str, str]) -> list[tuple[str, str]]:
    """One row per decoder layer: 'q 4b g64  k 4b g64  ...' (names without the layer prefix)."""
    rows: dict[str, list[str]] = {}
    for name, setting in bit_map.items():
        prefix, _, short = name.partition(".layers.")
        index, _, linear = short.partition(".")
        rows.setdefault(f"  layer {index}", []).append(f"{linear.rsplit('.', 1)[-1].removesuffix('_proj')} {setting}")
    return [(k, "  ".join(v)) for k, v in rows.items()]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_info(info: ModelInfo) -> str:
    rows = [("model", info.path),
            ("architecture", f"{info.architecture}, {info.num_layers} layers, hidden {info.hidden_size}"),
            ("parameters", f"{info.params / 1e6:.1f}M (dense)")]
    stored = ", ".join(f"{k} x{v}" for k, v in sorted(info.tensor_dtypes.items()))
    if info.format in ("awq", "gptq"):
        detail = {"awq": f"version={info.version} zero_point={info.zero_point}",
                  "gptq": f"checkpoint_format={info.checkpoint_format} desc_act={info.desc_act} sym={info.sym}"}
        rows.append(("format", f"{info.format} {info.bits}-bit, group size {info.group_size}, {detail[info.format]}"))
        rows.append(("quantized", f"{info.quantized_linears} of {info.linears} decoder linears"))
        if info.quantized_by:
            rows.append(("quantized by", " ".join(f"{k}={v}" for k, v in info.quantized_by.items() if v is not None)))
        if info.linear_bpw is not None:
            rows.append(("linear bpw", f"{info.linear_bpw:.4f} bits per weight over the decoder linears "
                                       f"(codes, fp16 scales, zeros)"))
        if info.bit_map:
            rows.append(("bit map", f"per linear: gptq `dynamic` overrides of the base {info.bits}-bit "
                                    f"g{info.group_size}"))
            rows += format_bit_map(info.bit_map)
    elif info.format == "compressed-tensors":
        rows.append(("format", f"{info.format}: {info.scheme}"))
        rows.append(("quantized", f"{info.quantized_linears} of {info.linears} decoder linears"))
        if info.quantized_by:
            rows.append(("quantized by", " ".join(f"{k}={v}" for k, v in info.quantized_by.items() if v is not None)))
    else:
        rows.append(("format", info.format))
    rows += [("tensors", stored),
             ("on disk", f"{_mb(info.disk_bytes)} (tensor files {_mb(info.weight_bytes)})"),
             ("bytes/param", f"{info.bytes_per_param:.3f} (tensor files / dense parameters; "
                             f"{8 * info.bytes_per_param:.2f} bits)"),
             (f"kernels ({info.device})", format_kernels(info.kernels))]
    if info.eval_results:
        rows.append(("measured", format_eval_results(info.eval_results)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_eval_results(data: dict) -> str:
    """One line of eval_results.json: ppl, KLD / top-1 against its reference, task headline scores."""
    r = data.get("results", {})
    parts = [f"{data.get('dataset', '?')} ppl {r['ppl']:.4f} ({data.get('windows', '?')} windows of "
             f"{data.get('seqlen', '?')})"] if "ppl" in r else []
    if "kld_mean" in r:
        parts.append(f"KLD {r['kld_mean']:.5f}, top-1 {100 * r['top1']:.2f}% vs {data.get('reference', '?')}")
    for task, t in (r.get("tasks") or {}).items():
        parts.append(f"{task} acc {t['acc']:.4f}")
    return "; ".join(parts) + f" (eval_results.json, {data.get('finished_at', '')})"
