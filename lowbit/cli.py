"""The `lowbit` command. Parses options, calls the library, prints; no logic of its own."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from lowbit.errors import LowbitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize LLMs, measure what it cost, run them fast.")
eval_app = typer.Typer(no_args_is_help=True, help="Measure model quality.")
app.add_typer(eval_app, name="eval")

MODEL_HELP = "a .gguf file, an HF or quantized model directory, or 'default' (SmolLM2-135M-Instruct)"
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks")):
    _state["debug"] = debug


@app.command()
def convert(model: str = typer.Argument(..., help=MODEL_HELP),
            out_dir: Path = typer.Argument(..., help="directory to write (must not exist)"),
            dtype: str = typer.Option("fp16", help="fp16 | bf16 | fp32"),
            overwrite: bool = typer.Option(False, help="replace OUT_DIR if it exists")):
    """Write MODEL as a standard HF directory (safetensors, config, tokenizer, chat template)."""
    from lowbit.convert import convert as do_convert
    from lowbit.models.default import resolve_model

    t0 = time.time()
    out = do_convert(resolve_model(model), out_dir, dtype, overwrite)
    typer.echo(f"wrote {out} in {time.time() - t0:.1f}s")


def _load(model: str, dtype: str, device: Optional[str]):
    from lowbit.loading.loader import load_model
    from lowbit.models.default import resolve_model

    return load_model(resolve_model(model), dtype, device)


@app.command()
def generate(model: str = typer.Argument("default", help=MODEL_HELP),
             prompt: str = typer.Option(..., "--prompt", "-p", help="the user message"),
             system: Optional[str] = typer.Option(None, help="system message"),
             raw: bool = typer.Option(False, help="send the prompt as is, without the chat template"),
             max_new_tokens: int = typer.Option(256, min=1),
             temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
             top_k: int = typer.Option(0, min=0), top_p: float = typer.Option(1.0, min=0.0, max=1.0),
             seed: Optional[int] = typer.Option(None),
             dtype: str = typer.Option("auto", help="compute dtype: auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16"),
             device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)"),
             tp: int = typer.Option(1, "--tp", min=1, help="tensor parallelism: split the model over this many GPUs (processes on the CPU)")):
    """Answer one prompt on the engine, streaming tokens as they come."""
    from lowbit.engine.sampling_params import SamplingParams
    from lowbit.serve.one_prompt import load_for_one

    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    llm, ids = load_for_one(model, prompt, max_new_tokens, system, raw, dtype, device, tp)
    t0, first_s = time.time(), None
    for out in llm.iter_outputs(ids, params):
        if out.error is not None:
            raise out.error
        first_s = first_s if first_s is not None else time.time() - t0
        sys.stdout.write(out.delta_text)
        sys.stdout.flush()
    n, rest_s = len(out.token_ids), time.time() - t0 - first_s
    rate = f", then {(n - 1) / rest_s:.1f} tokens/s" if n > 1 and rest_s > 0 else ""
    typer.echo(f"\n[{n} tokens; the first after {first_s:.2f}s{rate}]", err=True)
    llm.close()


@app.command()
def chat(model: str = typer.Argument("default", help=MODEL_HELP),
         url: Optional[str] = typer.Option(None, "--url", help="talk to a running `lowbit serve` instead"),
         api_key: Optional[str] = typer.Option(None, "--api-key", help="with --url: the server's API key"),
         system: Optional[str] = typer.Option(None, help="system message"),
         max_new_tokens: int = typer.Option(512, min=1),
         temperature: float = typer.Option(0.7, min=0.0), top_k: int = typer.Option(0, min=0),
         top_p: float = typer.Option(0.9, min=0.0, max=1.0), seed: Optional[int] = typer.Option(None),
         kv_bits: int = typer.Option(16, "--kv-bits", help="16 | 8 | 4"),
         dtype: str = typer.Option("auto", help="auto | fp32 | fp16 | bf16"),
         device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)"),
         tp: int = typer.Option(1, "--tp", min=1, help="tensor parallelism: split the model over this many GPUs (processes on the CPU)")):
    """Talk to MODEL in the terminal (on the engine, or a server with --url). /reset clears, /exit leaves."""
    from lowbit.serve.terminal_chat import chat_loop, engine_replier, remote_replier

    if url:
        reply = remote_replier(url, api_key, max_new_tokens, temperature, top_p, seed)
    else:
        reply = engine_replier(model, kv_bits, dtype, device, max_new_tokens, temperature, top_k, top_p, seed, tp)
    chat_loop(reply, system, write=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
              say=typer.echo)


@app.command()
def serve(model: str = typer.Argument("default", help=MODEL_HELP),
          host: str = typer.Option("127.0.0.1", help="address to listen on"),
          port: int = typer.Option(23333, min=1, max=65535),
          kv_bits: int = typer.Option(16, "--kv-bits", help="16 | 8 | 4"),
          api_key: Optional[str] = typer.Option(None, "--api-key", help="require 'Authorization: Bearer KEY'"),
          max_batch_size: int = typer.Option(64, "--max-batch-size", min=1),
          max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=2),
          max_waiting: int = typer.Option(256, "--max-waiting", min=1, help="waiting requests before 429"),
          ui: bool = typer.Option(False, "--ui", help="serve the web chat page at /"),
          served_model_name: Optional[str] = typer.Option(None, "--served-model-name"),
          dtype: str = typer.Option("auto", help="auto | fp32 | fp16 | bf16"),
          device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)"),
          dummy_weights: bool = typer.Option(False, "--dummy-weights",
                                             help="random weights of --arch's shapes (load tests); text in as bytes"),
          arch: Optional[str] = typer.Option(None, "--arch",
                                             help="with --dummy-weights: tiny | llama2-7b | llama3-8b | llama2-70b"),
          w_bits: int = typer.Option(16, "--w-bits", help="dummy weights: 16 (dense) | 4 (AWQ W4A16)"),
          group_size: int = typer.Option(128, "--group-size", help="W4A16 group size (dummy weights)"),
          tp: int = typer.Option(1, "--tp", min=1, help="tensor parallelism: split the model over this many GPUs (processes on the CPU)")):
    """An OpenAI-compatible API server (/v1/chat/completions, /v1/completions, /v1/models, /metrics)."""
    from lowbit.serve.api_server import serve as run_server

    run_server(model, host, port, kv_bits, api_key, max_batch_size, max_model_len, max_waiting, ui,
               served_model_name, dtype, device, dummy_weights, arch, w_bits, group_size, tp)


@app.command()
def webui(model: str = typer.Argument("default", help=MODEL_HELP),
          host: str = typer.Option("127.0.0.1"), port: int = typer.Option(23333, min=1, max=65535),
          kv_bits: int = typer.Option(16, "--kv-bits", help="16 | 8 | 4"),
          api_key: Optional[str] = typer.Option(None, "--api-key")):
    """`lowbit serve MODEL --ui`: the API server with the web chat page at /."""
    from lowbit.serve.api_server import serve as run_server

    run_server(model, host, port, kv_bits, api_key, ui=True)


@eval_app.command("ppl")
def eval_ppl(model: str = typer.Argument("default", help=MODEL_HELP),
             dataset: str = typer.Option("wikitext2", help="corpus name (wikitext2, tinyshakespeare, ...)"),
             seqlen: int = typer.Option(2048, min=2, help="tokens per non-overlapping window"),
             limit: Optional[int] = typer.Option(None, min=1, help="score only the first N windows"),
             batch_size: int = typer.Option(1, min=1, help="windows per forward pass"),
             kv_bits: int = typer.Option(16, "--kv-bits", help="16 | 8 | 4: attend through a paged KV cache of these bits"),
             json_out: Optional[Path] = typer.Option(None, "--json", help="also write the result as JSON here"),
             dtype: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16"),
             device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)")):
    """Perplexity on a dataset's eval split, in the GPTQ/AWQ papers' convention."""
    import json

    from lowbit.eval.ppl import perplexity

    _check_kv_bits(kv_bits)
    m, tok, _ = _load(model, dtype, device)
    res = perplexity(m, tok, dataset, seqlen, limit, batch_size, kv_bits=kv_bits)
    kv = f", KV {kv_bits}-bit" if kv_bits != 16 else ""
    typer.echo(f"{dataset} ppl {res.ppl:.4f} ({res.windows}/{res.total_windows} windows of {seqlen} tokens{kv}, "
               f"{res.seconds:.1f}s)")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(dict(res.to_dict(), model=model), indent=1) + "\n")


def _check_kv_bits(kv_bits: int) -> None:
    if kv_bits not in (16, 8, 4):
        raise LowbitError(f"--kv-bits {kv_bits}: expected 16, 8 or 4")


@eval_app.command("tasks")
def eval_tasks(model: str = typer.Argument("default", help=MODEL_HELP),
               tasks: str = typer.Option("hellaswag,arc_challenge,piqa,boolq,mmlu", help="comma-separated task names"),
               limit: Optional[int] = typer.Option(None, min=1, help="score only the first N items of each task "
                                                   "(mmlu: N questions taken round-robin over its subjects)"),
               num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0,
                                                         help="few-shot examples (default: mmlu 5, gsm8k 8, others 0)"),
               batch_size: int = typer.Option(4, "--batch-size", min=1, help="sequences per forward pass"),
               json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON here"),
               kv_bits: int = typer.Option(16, "--kv-bits", help="16 | 8 | 4: score (and generate) through a "
                                           "paged KV cache of these bits"),
               dtype: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16"),
               device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)")):
    """Multiple-choice accuracy (acc, acc_norm) by log-likelihood, and GSM8K by generation (exact match,
    strict and flexible), scored as lm-evaluation-harness does."""
    import json

    from lowbit.eval.provenance import provenance
    from lowbit.eval.tasks import parse_tasks, run_task

    names = parse_tasks(tasks)
    _check_kv_bits(kv_bits)
    triple = _load(model, dtype, device)
    m = triple[0]
    results, files = [], {}
    for name in names:
        res = run_task(triple, name, limit, num_fewshot, batch_size, kv_bits=kv_bits)
        if name == "gsm8k":  # generative: acc is the strict exact match, acc_norm the flexible one
            scores = (f"exact_match strict {res.acc:.4f} ± {res.acc_stderr:.4f}  "
                      f"flexible {res.acc_norm:.4f} ± {res.acc_norm_stderr:.4f}")
        else:
            scores = f"acc {res.acc:.4f} ± {res.acc_stderr:.4f}  acc_norm {res.acc_norm:.4f} ± {res.acc_norm_stderr:.4f}"
        results.append(res.to_dict())
        files.update(res.files)
        typer.echo(f"{name:14s} {res.num_fewshot}-shot n={res.n:5d}  {scores}  ({res.seconds:.1f}s)")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        for r in results:
            r.pop("files")  # listed once, in data_sha256
        out = dict(model=model, tasks=results, **provenance(files, str(next(m.parameters()).device)))
        json_out.write_text(json.dumps(out, indent=1) + "\n")


@eval_app.command("report")
def eval_report(checkpoints: list[str] = typer.Argument(..., help="checkpoints to compare, the reference first "
                                                       "(`default` = the embedded model)"),
                out: Path = typer.Option(..., "--out", help="directory for report.md / report.json / report.png"),
                dataset: str = typer.Option("wikitext2", help="corpus for perplexity and KL divergence"),
                seqlen: int = typer.Option(2048, min=2, help="tokens per window"),
                limit: Optional[int] = typer.Option(None, min=1, help="score only the first N windows"),
                tasks: str = typer.Option("", help="comma-separated tasks of `lowbit eval tasks` (none by default)"),
                task_limit: Optional[int] = typer.Option(None, "--task-limit", min=1, help="first N items of each task"),
                num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0),
                batch_size: int = typer.Option(4, "--batch-size", min=1),
                dtype: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16"),
                device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)")):
    """One table of what each quantization costs: size, bits per weight, ppl, KLD and top-1 against the
    first checkpoint, task accuracies; also written into each checkpoint directory (eval_results.json)."""
    from lowbit.eval.report import ReportOptions, run_report

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    opts = ReportOptions(dataset, seqlen, limit, names, task_limit, num_fewshot, batch_size, dtype, device)
    run_report(checkpoints, out, opts, log=typer.echo)
    typer.echo(f"wrote {out}/report.md, report.json, report.png")


@eval_app.command("kld")
def eval_kld(model: str = typer.Argument(..., help=MODEL_HELP),
             reference: str = typer.Option(..., "--reference", help="the reference model (usually the fp16 one), "
                                           "or a file written by --save-logits"),
             dataset: str = typer.Option("wikitext2", help="corpus name (ignored with a saved reference)"),
             seqlen: int = typer.Option(2048, min=2, help="tokens per non-overlapping window (as eval ppl)"),
             limit: Optional[int] = typer.Option(None, min=1, help="score only the first N windows"),
             save_logits: Optional[Path] = typer.Option(None, "--save-logits",
                                                        help="write the reference's top-k log-probs here"),
             top_k: int = typer.Option(64, "--top-k", min=1, help="with --save-logits: tokens kept per position"),
             kv_bits: int = typer.Option(16, "--kv-bits", help="16 | 8 | 4: the model (not the reference) attends "
                                         "through a paged KV cache of these bits"),
             json_out: Optional[Path] = typer.Option(None, "--json", help="also write the result as JSON here"),
             dtype: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16"),
             device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)")):
    """Per-token KL(reference || model) and top-1 agreement, as llama.cpp's --kl-divergence reports them."""
    import json

    from lowbit.eval.datasets import resolve
    from lowbit.eval.kld import kl_divergence
    from lowbit.eval.logit_store import is_saved_logits, load
    from lowbit.eval.provenance import provenance

    _check_kv_bits(kv_bits)
    saved = load(reference) if is_saved_logits(reference) else None
    if saved is not None and save_logits:
        raise LowbitError("--save-logits needs a reference model, not a saved file")
    m, tok, _ = _load(model, dtype, device)
    ref = None if saved is not None else _load(reference, dtype, device)[0]
    res = kl_divergence(m, tok, ref, saved, dataset, seqlen, limit, save_logits, top_k,
                        meta={"reference": reference}, kv_bits=kv_bits)
    typer.echo(f"{res.dataset} KLD mean {res.kld_mean:.6f} ± {res.kld_stderr:.6f}  median {res.kld_median:.6f}  "
               f"p90 {res.kld_p90:.6f}  p99 {res.kld_p99:.6f}  max {res.kld_max:.6f}  "
               f"top-1 {100 * res.top1_agreement:.2f}% ± {100 * res.top1_stderr:.2f}%  ppl {res.ppl_model:.4f} "
               f"(reference {res.ppl_reference:.4f})  {res.windows} windows, {res.tokens} tokens, {res.seconds:.1f}s")
    if save_logits:
        typer.echo(f"saved the reference's top-{top_k} log-probs to {save_logits}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        data = [reference] if saved is not None else [resolve(dataset, "eval").path]
        out = dict(res.to_dict(), model=model, **provenance(data, str(next(m.parameters()).device)))
        json_out.write_text(json.dumps(out, indent=1) + "\n")


@app.command()
def quantize(method: str = typer.Argument(..., help="rtn | awq | gptq | awq-gptq | mixed | smoothquant | w8a8 | fp8"),
             model: str = typer.Argument(..., help=MODEL_HELP),
             work_dir: Path = typer.Option(..., "--work-dir", help="directory to write the quantized checkpoint to"),
             w_bits: int = typer.Option(4, "--w-bits", help="2 | 3 | 4 | 8"),
             group_size: int = typer.Option(128, "--group-size", help="32 | 64 | 128 | -1 (per output channel)"),
             zero_point: bool = typer.Option(True, "--zero-point/--symmetric", help="asymmetric codes with a zero point"),
             calib_dataset: str = typer.Option("wikitext2", "--calib-dataset", help="corpus name in shared/data"),
             calib_samples: int = typer.Option(128, "--calib-samples", min=1),
             calib_seqlen: int = typer.Option(2048, "--calib-seqlen", min=1),
             seed: int = typer.Option(0, "--seed", help="which calibration windows are drawn"),
             device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)"),
             act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order",
                                                      help="GPTQ: columns by descending Hessian diagonal (default: on "
                                                           "for gptq and awq-gptq)"),
             mse_range: bool = typer.Option(False, "--mse-range/--no-mse-range",
                                            help="RTN/GPTQ: each group's range searched for the lowest rounding error"),
             static_groups: bool = typer.Option(True, "--static-groups/--no-static-groups",
                                                help="with --act-order: keep natural groups (no g_idx)"),
             fmt: Optional[str] = typer.Option(None, "--format", help="awq | gptq (default: awq for rtn/awq, gptq for gptq)"),
             overwrite: bool = typer.Option(False, help="replace --work-dir if it exists"),
             alpha: Optional[str] = typer.Option(None, "--alpha", help="smoothquant: migration strength in [0, 1] "
                                                 "(default 0.5), or auto (searched per layer)"),
             act_scheme: Optional[str] = typer.Option(None, "--act-scheme", help="smoothquant/w8a8/fp8: dynamic "
                                                      "(per token, default) | static (per tensor)"),
             bpw: Optional[float] = typer.Option(None, "--bpw", help="mixed: target average bits per weight, scales "
                                                 "and zeros counted (e.g. 4.0)"),
             measurement: Optional[Path] = typer.Option(None, "--measurement", help="mixed: reuse this "
                                                        "measurement.json (from `lowbit measure`) instead of measuring"),
             max_bytes: Optional[str] = typer.Option(None, "--max-bytes", help="mixed, instead of --bpw: the "
                                                     "weights' size to fit, e.g. 12GB or 11.5GiB (16-bit embeddings, "
                                                     "norms and head counted); the linears get what is left"),
             kv_tokens: int = typer.Option(0, "--kv-tokens", min=0, help="with --max-bytes: KV cache tokens to fit "
                                           "beside the weights (context x batch, e.g. 65536 for 8k x 8)"),
             kv_bits: int = typer.Option(16, "--kv-bits", help="with --kv-tokens: 16 | 8 | 4, the KV cache's bits"),
             next_inputs: str = typer.Option("quantized", "--next-inputs", help="awq/gptq/awq-gptq: calibrate each "
                                             "layer on the last one's quantized outputs (true-sequential) or its "
                                             "fp (full-precision) outputs, as llm-awq / AutoAWQ")):
    """Quantize MODEL's linear weights with RTN, AWQ, GPTQ or AWQ+GPTQ and write an AWQ or GPTQ checkpoint;
    smoothquant | w8a8 | fp8 quantize weights and activations to 8 bits (a compressed-tensors checkpoint)."""
    from lowbit.quant.api import quantize as do_quantize

    w8a8 = {k: v for k, v in {"alpha": alpha, "act_scheme": act_scheme}.items() if v is not None}
    if next_inputs != "quantized":  # checked (and refused for the other methods) by quantize itself
        w8a8["next_inputs"] = next_inputs
    budget = {}  # the byte budget's options, only those given (quantize refuses them for other methods)
    if max_bytes is not None:
        budget["max_bytes"] = max_bytes
    if kv_tokens:
        budget["kv_tokens"] = kv_tokens
    if kv_bits != 16:
        budget["kv_bits"] = kv_bits
    if method == "mixed" or bpw is not None or measurement is not None or budget:  # per-linear bits: quant/mixed.py
        res = do_quantize(model, method, work_dir, bpw=bpw, measurement=measurement, calib_dataset=calib_dataset,
                          calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed, device=device,
                          overwrite=overwrite, log=lambda line: typer.echo(line, err=True), **budget, **w8a8)
        asked = f"--bpw {bpw:g}" if bpw is not None else f"--max-bytes {max_bytes} ({res.options['bpw_target']:.4f} bpw)"
        typer.echo(f"wrote {res.out_dir} (mixed: {res.options['bpw']:.4f} bpw for {asked}) in {res.seconds:.1f}s")
        return
    if method in ("smoothquant", "w8a8", "fp8"):
        res = do_quantize(model, method, work_dir, calib_dataset=calib_dataset, calib_samples=calib_samples,
                          calib_seqlen=calib_seqlen, seed=seed, device=device, act_order=act_order, fmt=fmt,
                          overwrite=overwrite, log=lambda line: typer.echo(line, err=True), **w8a8)
        typer.echo(f"wrote {res.out_dir} ({method}: {res.options['scheme']}) in {res.seconds:.1f}s")
        return
    res = do_quantize(model, method, work_dir, w_bits=w_bits, group_size=group_size, zero_point=zero_point,
                      calib_dataset=calib_dataset, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                      seed=seed, device=device, act_order=act_order, static_groups=static_groups, fmt=fmt, mse=mse_range,
                      overwrite=overwrite, log=lambda line: typer.echo(line, err=True), **w8a8)
    typer.echo(f"wrote {res.out_dir} ({method} w{w_bits} g{group_size}) in {res.seconds:.1f}s")


@app.command()
def measure(model: str = typer.Argument(..., help=MODEL_HELP),
            out: Path = typer.Option(Path("measurement.json"), "--out", help="the measurement file; an unfinished "
                                     "one of the same model and options is resumed"),
            calib_dataset: str = typer.Option("wikitext2", "--calib-dataset", help="corpus name in shared/data"),
            calib_samples: int = typer.Option(128, "--calib-samples", min=1),
            calib_seqlen: int = typer.Option(2048, "--calib-seqlen", min=1),
            seed: int = typer.Option(0, "--seed", help="which calibration windows are drawn"),
            device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)")):
    """Measure every linear's GPTQ error at bits 2-8 x group sizes 32/64/128, then its sensitivity (the KL
    a unit of its output error costs), for `quantize mixed --measurement`."""
    from lowbit.quant.measure import measure as do_measure

    t0 = time.time()
    data = do_measure(model, out, calib_dataset=calib_dataset, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                      seed=seed, device=device, log=lambda line: typer.echo(line, err=True))
    n_options = sum(len(e["options"]) for e in data["measurement"])
    typer.echo(f"wrote {out}: {len(data['measurement'])} linears, {n_options} options, {data['seconds']:.1f}s of "
               f"measuring (this run {time.time() - t0:.1f}s)")


@app.command()
def info(model: str = typer.Argument(..., help=MODEL_HELP),
         as_json: bool = typer.Option(False, "--json", help="print the facts as one JSON object")):
    """Architecture, parameters, weight format (dtype / awq / gptq, bits, group size), size on disk."""
    import json

    from lowbit.loading.info import format_info, model_info
    from lowbit.models.default import resolve_model

    facts = model_info(resolve_model(model))
    typer.echo(json.dumps(facts.to_dict(), indent=1) if as_json else format_info(facts))


# -- lowbit bench --------------------------------------------------------------------------------
bench_app = typer.Typer(no_args_is_help=True, help="Measure speed and memory (JSON + PNG into --out).")
app.add_typer(bench_app, name="bench")
_DUMMY = typer.Option(False, "--dummy-weights", help="random weights of --arch's shapes, made on the device")
_ARCH = typer.Option(None, "--arch", help="with --dummy-weights: tiny | llama2-7b | llama3-8b | llama2-70b")
_GROUP = typer.Option(128, "--group-size", help="W4A16 group size (dummy weights)")
_GPU_UTIL = typer.Option(0.9, "--gpu-memory-utilization", min=0.01, max=1.0)
_DTYPE = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16")
_DEVICE = typer.Option(None, help="cpu | cuda (default: cuda if present)")


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LowbitError(f"{what} {text!r}: expected comma-separated integers, e.g. 1,16,64") from None


def _wrote(rec: dict) -> None:
    typer.echo(f"wrote {rec['json']}" + (f" and {rec['png']}" if rec.get("png") else ""))


def _spec(model, dummy, arch, w_bits, group_size, dtype, device):
    from lowbit.bench.common import ModelSpec

    return ModelSpec(model, dummy, arch, w_bits, group_size, dtype, device)


@bench_app.command("generate")
def bench_generate(model: str = typer.Argument("default", help=MODEL_HELP), dummy_weights: bool = _DUMMY,
                   arch: Optional[str] = _ARCH,
                   w_bits: int = typer.Option(16, "--w-bits", help="dummy weights: 16 (fp16) | 8 (W8A8 int8) | 4 (AWQ W4A16)"),
                   group_size: int = _GROUP,
                   concurrency: str = typer.Option("1,16,64", help="concurrent requests, comma-separated"),
                   input_len: int = typer.Option(1, "--input-len", min=1),
                   output_len: int = typer.Option(512, "--output-len", min=1),
                   kv_bits: str = typer.Option("16", "--kv-bits", help="16 | 8 | 4, or several: 16,8"),
                   max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1),
                   gpu_memory_utilization: float = _GPU_UTIL,
                   enforce_eager: bool = typer.Option(False, "--enforce-eager", help="no CUDA graphs"),
                   seed: int = typer.Option(0), dtype: str = _DTYPE, device: Optional[str] = _DEVICE,
                   out: Path = typer.Option(Path("bench-results"), "--out", help="directory for generate.json/.png"),
                   tp: int = typer.Option(1, "--tp", min=1, help="tensor parallelism: split the model over this many GPUs (processes on the CPU)")):
    """First-token and per-token latency (p50/p90/p99), output tokens/s and peak memory per concurrency."""
    from lowbit.bench.generate import GenerateOptions, run_generate

    opts = GenerateOptions(_ints(concurrency, "--concurrency"), input_len, output_len, _ints(kv_bits, "--kv-bits"),
                           max_model_len, gpu_memory_utilization, enforce_eager, seed=seed, tp=tp)
    rec = run_generate(_spec(model, dummy_weights, arch, w_bits, group_size, dtype, device), opts, out,
                       log=lambda line: typer.echo(line, err=True))
    _wrote(rec)


@bench_app.command("throughput")
def bench_throughput(model: str = typer.Argument("default", help=MODEL_HELP), dummy_weights: bool = _DUMMY,
                     arch: Optional[str] = _ARCH, w_bits: int = typer.Option(16, "--w-bits"),
                     group_size: int = _GROUP,
                     dataset: str = typer.Option("sharegpt", help="conversational set in shared/data; else synthetic"),
                     num_prompts: int = typer.Option(1000, "--num-prompts", min=1),
                     input_len: int = typer.Option(512, "--input-len", min=1, help="synthetic: mean prompt length"),
                     output_len: int = typer.Option(128, "--output-len", min=1, help="synthetic: mean output length"),
                     range_ratio: float = typer.Option(0.5, "--range-ratio", help="synthetic: lengths vary by +-this"),
                     kv_bits: int = typer.Option(16, "--kv-bits"),
                     max_batch_size: int = typer.Option(64, "--max-batch-size", min=1),
                     max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1),
                     gpu_memory_utilization: float = _GPU_UTIL,
                     enforce_eager: bool = typer.Option(False, "--enforce-eager"),
                     seed: int = typer.Option(0), dtype: str = _DTYPE, device: Optional[str] = _DEVICE,
                     out: Path = typer.Option(Path("bench-results"), "--out"),
                     tp: int = typer.Option(1, "--tp", min=1, help="tensor parallelism: split the model over this many GPUs (processes on the CPU)")):
    """Offline throughput: all requests at once; requests/s and tokens/s."""
    from lowbit.bench.throughput import ThroughputOptions, run_throughput

    opts = ThroughputOptions(dataset, num_prompts, input_len, output_len, range_ratio, kv_bits, max_batch_size,
                             max_model_len, gpu_memory_utilization, enforce_eager, seed, tp)
    rec = run_throughput(_spec(model, dummy_weights, arch, w_bits, group_size, dtype, device), opts, out,
                         log=lambda line: typer.echo(line, err=True))
    _wrote(rec)


@bench_app.command("memory")
def bench_memory(model: str = typer.Argument("default", help=MODEL_HELP), dummy_weights: bool = _DUMMY,
                 arch: Optional[str] = _ARCH,
                 w_bits: str = typer.Option("16,4", "--w-bits", help="dummy weights: any of 16, 8 (W8A8 int8), 4"),
                 group_size: int = _GROUP, kv_bits: str = typer.Option("16,8,4", "--kv-bits"),
                 max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1),
                 gpu_memory_utilization: float = _GPU_UTIL,
                 hf: bool = typer.Option(True, "--hf/--no-hf", help="also measure transformers' fp16 model"),
                 dtype: str = typer.Option("fp16", help="weights and 16-bit KV dtype: fp16 | bf16 | fp32"),
                 device: Optional[str] = _DEVICE, out: Path = typer.Option(Path("bench-results"), "--out")):
    """Weights, KV bytes per token and per 2048/4096-token sequence, tokens the cache holds, peak at load."""
    from lowbit.bench.memory import MemoryOptions, run_memory

    opts = MemoryOptions(_ints(w_bits, "--w-bits"), _ints(kv_bits, "--kv-bits"), max_model_len=max_model_len,
                         gpu_memory_utilization=gpu_memory_utilization, hf=hf)
    rec = run_memory(_spec(model, dummy_weights, arch, 16, group_size, dtype, device), opts, out,
                     log=lambda line: typer.echo(line, err=True))
    _wrote(rec)


@bench_app.command("serve")
def bench_serve(url: str = typer.Option("http://127.0.0.1:23333", "--url", help="a running `lowbit serve`"),
                num_prompts: int = typer.Option(32, "--num-prompts", min=1),
                concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1,
                                                          help="requests in flight at once (default 8)"),
                request_rate: Optional[float] = typer.Option(None, "--request-rate", min=0.001,
                                                             help="Poisson arrivals per second instead"),
                max_tokens: int = typer.Option(64, "--max-tokens", min=1),
                dataset: str = typer.Option("tinyshakespeare", help="corpus the prompts are drawn from, or synthetic"),
                seed: int = typer.Option(0),
                api_key: Optional[str] = typer.Option(None, "--api-key"),
                out: Path = typer.Option(Path("bench-results"), "--out", help="folder for bench_serve.json/.png")):
    """Request throughput, time to first token and inter-token latency of a running server."""
    from lowbit.bench.common import write_json
    from lowbit.bench.plots import try_plot
    from lowbit.serve.bench_client import bench_serve as run_bench, plot_serve

    rec = run_bench(url, num_prompts, concurrency, request_rate, max_tokens, dataset, seed, api_key)
    rec["png"] = try_plot(plot_serve, rec, out / "bench_serve.png", log=lambda line: typer.echo(line, err=True))
    rec["json"] = str(write_json(out, "bench_serve", rec))
    typer.echo(f"{rec['completed']}/{num_prompts} requests in {rec['duration_s']:.1f}s: {rec['requests_per_s']:.2f} req/s, "
               f"{rec['output_tokens_per_s']:.1f} output tok/s, TTFT p50 {rec['ttft_ms']['p50'] or 0:.0f} ms, "
               f"ITL p50 {rec['itl_ms']['p50'] or 0:.1f} ms")
    _wrote(rec)
    if rec["failed"]:
        raise LowbitError(f"{rec['failed']} of {num_prompts} requests failed: {'; '.join(rec['errors'])}")


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app()
    except LowbitError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
