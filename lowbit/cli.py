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


def _sampling(temperature, top_k, top_p, seed):
    from lowbit.layers.sampler import SamplingOptions

    return SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


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
             device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)")):
    """Answer one prompt, streaming tokens as they come."""
    from lowbit.engine.generator import stream_text

    m, tok, ckpt = _load(model, dtype, device)
    if raw:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages)
    stop = tok.stop_token_ids(ckpt.generation_config().get("eos_token_id"))
    t0, n = time.time(), 0
    for piece in stream_text(m, tok, ids, max_new_tokens, _sampling(temperature, top_k, top_p, seed), stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    dt = time.time() - t0
    typer.echo(f"\n[{n} pieces in {dt:.1f}s]", err=True)


@app.command()
def chat(model: str = typer.Argument("default", help=MODEL_HELP),
         system: Optional[str] = typer.Option(None, help="system message"),
         max_new_tokens: int = typer.Option(512, min=1),
         temperature: float = typer.Option(0.7, min=0.0), top_k: int = typer.Option(0, min=0),
         top_p: float = typer.Option(0.9, min=0.0, max=1.0), seed: Optional[int] = typer.Option(None),
         dtype: str = typer.Option("auto", help="auto | fp32 | fp16 | bf16"),
         device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)")):
    """Talk to MODEL in the terminal. /reset clears the conversation, /exit leaves."""
    from lowbit.engine.generator import stream_text

    m, tok, ckpt = _load(model, dtype, device)
    stop = tok.stop_token_ids(ckpt.generation_config().get("eos_token_id"))
    opts = _sampling(temperature, top_k, top_p, seed)
    history = [{"role": "system", "content": system}] if system else []
    typer.echo("lowbit chat: /reset clears the conversation, /exit leaves.")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            typer.echo("(conversation cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for piece in stream_text(m, tok, tok.encode_chat(history), max_new_tokens, opts, stop):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


@eval_app.command("ppl")
def eval_ppl(model: str = typer.Argument("default", help=MODEL_HELP),
             dataset: str = typer.Option("wikitext2", help="corpus name (wikitext2, tinyshakespeare, ...)"),
             seqlen: int = typer.Option(2048, min=2, help="tokens per non-overlapping window"),
             limit: Optional[int] = typer.Option(None, min=1, help="score only the first N windows"),
             batch_size: int = typer.Option(1, min=1, help="windows per forward pass"),
             json_out: Optional[Path] = typer.Option(None, "--json", help="also write the result as JSON here"),
             dtype: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16"),
             device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if present)")):
    """Perplexity on a dataset's eval split, in the GPTQ/AWQ papers' convention."""
    import json

    from lowbit.eval.ppl import perplexity

    m, tok, _ = _load(model, dtype, device)
    res = perplexity(m, tok, dataset, seqlen, limit, batch_size)
    typer.echo(f"{dataset} ppl {res.ppl:.4f} ({res.windows}/{res.total_windows} windows of {seqlen} tokens, "
               f"{res.seconds:.1f}s)")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(dict(res.to_dict(), model=model), indent=1) + "\n")


@app.command()
def quantize(method: str = typer.Argument(..., help="rtn | awq | gptq"),
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
             act_order: bool = typer.Option(False, "--act-order", help="GPTQ: columns by descending Hessian diagonal"),
             static_groups: bool = typer.Option(True, "--static-groups/--no-static-groups",
                                                help="with --act-order: keep natural groups (no g_idx)"),
             fmt: Optional[str] = typer.Option(None, "--format", help="awq | gptq (default: awq for rtn/awq, gptq for gptq)"),
             overwrite: bool = typer.Option(False, help="replace --work-dir if it exists")):
    """Quantize MODEL's linear weights with RTN, AWQ or GPTQ and write an AWQ or GPTQ checkpoint."""
    from lowbit.quant.api import quantize as do_quantize

    res = do_quantize(model, method, work_dir, w_bits=w_bits, group_size=group_size, zero_point=zero_point,
                      calib_dataset=calib_dataset, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                      seed=seed, device=device, act_order=act_order, static_groups=static_groups, fmt=fmt,
                      overwrite=overwrite, log=lambda line: typer.echo(line, err=True))
    typer.echo(f"wrote {res.out_dir} ({method} w{w_bits} g{group_size}) in {res.seconds:.1f}s")


@app.command()
def info(model: str = typer.Argument(..., help=MODEL_HELP),
         as_json: bool = typer.Option(False, "--json", help="print the facts as one JSON object")):
    """Architecture, parameters, weight format (dtype / awq / gptq, bits, group size), size on disk."""
    import json

    from lowbit.loading.info import format_info, model_info
    from lowbit.models.default import resolve_model

    facts = model_info(resolve_model(model))
    typer.echo(json.dumps(facts.to_dict(), indent=1) if as_json else format_info(facts))


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
