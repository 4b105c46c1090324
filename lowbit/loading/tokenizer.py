"""The tokenizer a model runs with: a `tokenizers.Tokenizer`, its special tokens, and the chat
template rendered with Jinja2 the way HF's `apply_chat_template` renders it."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from lowbit.errors import LowbitError

# End-of-turn markers of common chat templates; generation stops on any that the vocab has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>")


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_template: str | None, bos_token: str | None,
                 eos_token: str | None, add_bos: bool = False):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tok.token_to_id(eos_token) if eos_token else None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise LowbitError(f"{path}: no tokenizer.json (lowbit reads fast-tokenizer files only)")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise LowbitError(f"{tj}: not a readable tokenizer ({e})") from None
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        jinja = path / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        if isinstance(template, list):  # HF allows named templates; "default" is the chat one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, template, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")),
                   bool(cfg.get("add_bos_token", False)))

    def stop_token_ids(self, extra: list[int] | int | None = None) -> set[int]:
        ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        for t in END_OF_TURN_TOKENS:
            i = self.tok.token_to_id(t)
            if i is not None:
                ids.add(i)
        if extra is not None:
            ids.update([extra] if isinstance(extra, int) else extra)
        return ids

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """`tools` (OpenAI's tool definitions) go to the template as HF's `tools`; a template that
        does not use them ignores them."""
        if not self.chat_template:
            # no template: plain concatenation, so base models still answer something sensible
            return "\n".join(m.get("content") or "" for m in messages) + ("\n" if add_generation_prompt else "")
        return _render(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                       bos_token=self.bos_token or "", eos_token=self.eos_token or "", tools=tools)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.apply_chat_template(messages, tools=tools)
        # a template that already wrote the BOS must not get a second one
        return self.encode(text, add_special_tokens=not (self.bos_token and text.startswith(self.bos_token)))

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.tok.save(str(out / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
            "chat_template": self.chat_template,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        special = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):  # AddedToken serialized
        return tok.get("content")
    return tok


def _render(template: str, **kwargs) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise LowbitError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(**kwargs)
    except jinja2.TemplateError as e:
        raise LowbitError(f"chat template failed to render: {e}") from None
