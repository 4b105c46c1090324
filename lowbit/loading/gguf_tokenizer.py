"""Rebuild a `tokenizers` BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`).

Pre-tokenizers follow llama.cpp's `tokenizer.ggml.pre` names: the regexes are the ones llama.cpp
lists for each name in llama-vocab.cpp (facts about the format, checked there)."""
from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lowbit.errors import LowbitError
from lowbit.loading.tokenizer import Tokenizer

# GPT-2's split, written with \p classes (llama.cpp's default for BPE vocabularies).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's split (`llama-bpe`): case-insensitive contractions, digits in runs of at most 3.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("smollm", "starcoder", "refact", "falcon3"):
        # digits one by one, then the GPT-2 split
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(_GPT2_SPLIT), behavior="isolated"), byte_level])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_GPT2_SPLIT), behavior="isolated"), byte_level])


def tokenizer_from_gguf(gguf) -> Tokenizer:
    f = gguf._field
    kind = f("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LowbitError(f"{gguf.path}: GGUF tokenizer model {kind!r} is not supported yet (lowbit rebuilds 'gpt2' "
                          f"BPE vocabularies); convert the model from its HF directory instead")
    tokens = f("tokenizer.ggml.tokens")
    merges = f("tokenizer.ggml.merges") or []
    types = f("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(f("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def name(key):
        i = f(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return Tokenizer(tok, f("tokenizer.chat_template"), name("tokenizer.ggml.bos_token_id"),
                     name("tokenizer.ggml.eos_token_id"), bool(f("tokenizer.ggml.add_bos_token", False)))
