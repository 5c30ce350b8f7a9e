"""The tokenizer of a Hugging Face model as GGUF metadata (``tokenizer.ggml.*``), the way llama.cpp's
``convert_hf_to_gguf.py`` writes it for every architecture qlorakit exports (the vocabulary is the same
whether the blocks are LLaMA, Qwen2 or MPT):

* GPT-2 style byte-level BPE (``"gpt2"``: SmolLM2, Llama 3, Qwen2, MPT's GPT-NeoX tokenizer), with the
  pre-tokenizer named the way llama.cpp recognises it (``tokenizer.ggml.pre``);
* sentencepiece-style BPE with byte fallback (``"llama"``: Llama 2, Mistral).
"""

from __future__ import annotations

import json
import re
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable

import gguf
from transformers import AutoTokenizer, PreTrainedTokenizerBase

__all__ = ["add_tokenizer"]

# The text llama.cpp encodes to fingerprint a byte-level BPE pre-tokenizer (get_vocab_base_pre).
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(tokenizer.encode(_CHKTXT)) -> tokenizer.ggml.pre, as llama.cpp's get_vocab_base_pre maps them,
# for the byte-level BPE tokenizers that ship with the architectures qlorakit exports.
_KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",  # MPT's GPT-NeoX tokenizer
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2 itself
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")



def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, chat_template: str | None) -> None:
    """Write ``tokenizer.ggml.*`` and ``tokenizer.chat_template``, as the converter's set_vocab does."""
    tokenizer_json = _read_tokenizer_json(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    largest_id = max(tokenizer.get_vocab().values())
    if largest_id >= vocab_size:
        raise ValueError(
            f"Cannot export to GGUF: the tokenizer has token id {largest_id} "
            f"but the model's vocab_size is {vocab_size}."
        )

    if _is_byte_level_bpe(tokenizer_json):
        tokens, token_types = _gpt2_tokens(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer, tokenizer_json))
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
    elif _is_sentencepiece_bpe(tokenizer_json):
        tokens, token_types = _llama_tokens(tokenizer, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_merge_rank_scores(tokens, tokenizer_json["model"]["merges"]))
        writer.add_token_types(token_types)
        writer.add_add_space_prefix(_adds_space_prefix(tokenizer))
    else:
        raise ValueError(
            f"Cannot export the tokenizer in {model_dir} to GGUF: supported are GPT-2 style byte-level BPE "
            f"('gpt2') and sentencepiece-style BPE with byte fallback ('llama') in tokenizer.json."
        )

    # SpecialVocab is llama.cpp's own reader for merges and bos/eos/unk/pad ids. What it cannot
    # see reliably -- whether BOS/EOS get added, the chat template -- we take from the tokenizer.
    # Merges are written for "llama" too: llama.cpp ignores them there, but transformers rebuilds
    # the tokenizer from them exactly instead of guessing merges from the scores.
    special_vocab = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special_vocab.add_special_token.update(_added_special_tokens(tokenizer))
    special_vocab.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
    special_vocab.add_to_gguf(writer, quiet=True)


def _read_tokenizer_json(model_dir: Path) -> dict[str, Any]:
    """The parsed ``tokenizer.json``; a GGUF vocabulary is built from the fast tokenizer's files."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"Cannot export the tokenizer in {model_dir} to GGUF: it has no tokenizer.json "
            f"(save it with a fast tokenizer's save_pretrained)."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _is_byte_level_bpe(tokenizer_json: dict[str, Any]) -> bool:
    """Whether this is a GPT-2 style byte-level BPE (the check gguf-py's BpeVocab makes)."""
    model, decoder = tokenizer_json["model"], tokenizer_json.get("decoder") or {}
    return model["type"] == "BPE" and not model.get("byte_fallback", False) and decoder.get("type") == "ByteLevel"


def _is_sentencepiece_bpe(tokenizer_json: dict[str, Any]) -> bool:
    """Whether this is a sentencepiece-style BPE with byte fallback (the check gguf-py's LlamaHfVocab makes)."""
    model, decoder = tokenizer_json["model"], tokenizer_json.get("decoder") or {}
    return model["type"] == "BPE" and model.get("byte_fallback", False) and decoder.get("type") == "Sequence"


def _vocab_table(tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                 classify: Callable[[int, str], tuple[str, int]]) -> tuple[list[str], list[int]]:
    """Token texts and types for ids 0..vocab_size-1: ``classify(id, token)`` for the tokenizer's own tokens,
    ``[PAD<id>]`` (unused) where the embedding is padded past the tokenizer."""
    reverse_vocab = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    tokens, token_types = [], []
    for token_id in range(vocab_size):
        token = reverse_vocab.get(token_id)
        text, kind = (f"[PAD{token_id}]", gguf.TokenType.UNUSED) if token is None else classify(token_id, token)
        tokens.append(text)
        token_types.append(kind)
    return tokens, token_types


def _gpt2_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts and types for a byte-level BPE vocabulary, as TextModel.get_vocab_base builds them."""
    added_vocab = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder

    def classify(token_id: int, token: str) -> tuple[str, int]:
        if token not in added_vocab:
            return token, gguf.TokenType.NORMAL
        # llama.cpp matches added tokens against normalized text, so store them normalized.
        if not added_decoder[token_id].normalized:
            token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
        if added_decoder[token_id].special or _looks_special(token):
            return token, gguf.TokenType.CONTROL
        return token.replace("\u2581", " "), gguf.TokenType.USER_DEFINED  # pre-normalize user-defined spaces

    return _vocab_table(tokenizer, vocab_size, classify)


def _looks_special(token: str) -> bool:
    """Whether an added token is a control token its tokenizer forgot to mark special (does_token_look_special)."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase, tokenizer_json: dict[str, Any]) -> str:
    """``tokenizer.ggml.pre``: which pre-tokenizer regex llama.cpp must apply before the BPE merges.

    Known tokenizers are recognised by llama.cpp's fingerprint; an unknown one is accepted only
    when it is the plain GPT-2 byte-level pre-tokenizer, which llama.cpp calls "gpt-2".
    """
    fingerprint = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if fingerprint in _KNOWN_PRE_TOKENIZERS:
        return _KNOWN_PRE_TOKENIZERS[fingerprint]
    pre_tokenizer = tokenizer_json.get("pre_tokenizer") or {}
    if pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2"
    raise ValueError(
        f"Cannot export this byte-level BPE tokenizer to GGUF: llama.cpp would not know its pre-tokenizer "
        f"(fingerprint {fingerprint}); supported are {', '.join(sorted(set(_KNOWN_PRE_TOKENIZERS.values())))} "
        f"and plain GPT-2 byte-level."
    )


def _llama_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts and types for a sentencepiece-style vocabulary, typed as gguf-py's LlamaHfVocab types them."""
    added_vocab = tokenizer.get_added_vocab()
    control_ids = set(tokenizer.all_special_ids) | {
        token_id for token_id, added in tokenizer.added_tokens_decoder.items() if added.special
    }

    def classify(token_id: int, token: str) -> tuple[str, int]:
        if _BYTE_TOKEN.fullmatch(token):
            return token, gguf.TokenType.BYTE
        if token_id in control_ids:
            return token, gguf.TokenType.CONTROL
        return token, gguf.TokenType.USER_DEFINED if token in added_vocab else gguf.TokenType.NORMAL

    return _vocab_table(tokenizer, vocab_size, classify)


def _merge_rank_scores(tokens: list[str], merges: list) -> list[float]:
    """Sentencepiece scores that reproduce the BPE merge order: minus the rank of the merge making each token.

    llama.cpp's sentencepiece tokenizer merges the adjacent pair whose result scores highest, so
    ranking merged tokens by merge order gives the same segmentation as the BPE merges. gguf-py's
    LlamaHfVocab scores every token -1000 instead, which leaves llama.cpp no order to follow.
    Tokens no merge produces (single characters, bytes, specials) score 0, as in sentencepiece.
    """
    score_by_token: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        score_by_token.setdefault(left + right, -float(rank))
    return [score_by_token.get(token, 0.0) for token in tokens]


def _adds_space_prefix(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer prepends a word boundary (▁) to the text, as sentencepiece's dummy prefix does."""
    return tokenizer.tokenize("a")[0].startswith("\u2581")


def _added_special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, bool]:
    """``{"bos": ..., "eos": ...}``: whether encoding text adds BOS at the start and EOS at the end.

    Observed rather than read from config files, because tokenizers declare it in several places.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a")["input_ids"]
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos_id is not None and len(wrapped) > len(plain) and wrapped[0] == bos_id
    adds_eos = eos_id is not None and len(wrapped) > len(plain) and wrapped[-1] == eos_id
    return {"bos": adds_bos, "eos": adds_eos}
