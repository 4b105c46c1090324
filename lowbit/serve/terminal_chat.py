"""`lowbit chat`: the conversation loop, over the engine in this process or a running server.

A replier takes the conversation so far and yields the answer's text pieces as they stream."""
from __future__ import annotations

from typing import Callable, Iterator

Replier = Callable[[list[dict]], Iterator[str]]


def engine_replier(model: str, kv_bits: int, dtype: str, device, max_tokens: int, temperature: float, top_k: int,
                   top_p: float, seed, tp: int = 1) -> Replier:
    from lowbit.engine.llm import LLM
    from lowbit.engine.sampling_params import SamplingParams

    llm = LLM(model, kv_bits=kv_bits, max_batch_size=1, dtype=dtype, device=device, tensor_parallel_size=tp)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def reply(messages: list[dict]) -> Iterator[str]:
        for out in llm.iter_outputs(llm.tokenizer.encode_chat(messages), params):
            if out.error is not None:
                raise out.error
            if out.delta_text:
                yield out.delta_text

    return reply


def remote_replier(url: str, api_key, max_tokens: int, temperature: float, top_p: float, seed) -> Replier:
    from lowbit.serve.chat_client import chunk_text, model_name, stream_chat

    name = model_name(url, api_key)

    def reply(messages: list[dict]) -> Iterator[str]:
        for chunk in stream_chat(url, name, messages, api_key, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed):
            text = chunk_text(chunk)
            if text:
                yield text

    return reply


def chat_loop(reply: Replier, system: str | None, write: Callable[[str], object], say: Callable[[str], object],
              read: Callable[[str], str] = input) -> None:
    history = [{"role": "system", "content": system}] if system else []
    say("lowbit chat: /reset clears the conversation, /exit leaves.")
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            say("(conversation cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = []
        for piece in reply(history):
            answer.append(piece)
            write(piece)
        write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
