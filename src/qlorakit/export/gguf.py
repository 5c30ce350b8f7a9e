"""Export a Hugging Face LLaMA-family checkpoint to a GGUF file, in pure Python.

This follows what llama.cpp's ``convert_hf_to_gguf.py`` does for ``LlamaForCausalLM``
(its ``LlamaModel`` class), using the ``gguf`` package's ``GGUFWriter`` so that no
llama.cpp build is needed:

* ``llama.*`` hyperparameters, named and valued as the converter writes them;
* tensor names from gguf-py's LLaMA tensor map, with the Q/K rows permuted the way
  llama.cpp's rotary embedding expects (``LlamaModel.permute``);
* 1-D tensors and norms kept in F32, every other weight in the chosen ``outtype``;
* the tokenizer as ``tokenizer.ggml.*`` metadata: GPT-2 style byte-level BPE
  (``"gpt2"``, e.g. SmolLM2, Llama 3) or sentencepiece-style BPE (``"llama"``).

Tensors are written one at a time, so memory use stays at about one tensor.
"""

from __future__ import annotations

import json
import math
import re
from functools import partial
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, NamedTuple

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

__all__ = ["export_gguf", "OUTTYPES", "SUPPORTED_ARCHITECTURES"]

#: outtype name -> (file type recorded in ``general.file_type``, ggml type of the weight matrices)
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

_ARCH = gguf.MODEL_ARCH.LLAMA
_ROPE_TYPES = ("default", "linear", "llama3")

# The text llama.cpp encodes to fingerprint a byte-level BPE pre-tokenizer (get_vocab_base_pre).
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(tokenizer.encode(_CHKTXT)) -> tokenizer.ggml.pre, copied from llama.cpp's
# get_vocab_base_pre for the byte-level BPE tokenizers that ship with LlamaForCausalLM models.
_KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class _PlannedTensor(NamedTuple):
    """One tensor of the output file: everything the header needs, and how to get its values."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch order
    ggml_type: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # float32 values, already in llama.cpp's layout


def export_gguf(
    model_dir: str | Path,
    out_file: str | Path,
    outtype: str = "f16",
    chat_template: str | None = None,
) -> Path:
    """Write the LLaMA-family model in ``model_dir`` to the GGUF file ``out_file``.

    Args:
        model_dir: a Hugging Face model directory: ``config.json``, ``*.safetensors``
            (sharded ones with ``model.safetensors.index.json``) and the tokenizer files
            written by ``tokenizer.save_pretrained``.
        out_file: the ``.gguf`` path to write; its parent directory must exist.
        outtype: ``"f16"``, ``"bf16"`` or ``"q8_0"`` for the weight matrices.
        chat_template: stored as ``tokenizer.chat_template``; defaults to the tokenizer's own.

    Returns:
        ``out_file`` as a ``Path``.

    Raises:
        ValueError: for an unknown ``outtype``, an architecture other than LLaMA, a quantized
            checkpoint, or a tokenizer kind llama.cpp's LLaMA converter does not handle.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    file_type, weight_type = _outtype_types(outtype)
    config = _load_llama_config(model_dir)
    tensors = _plan_tensors(model_dir, config, weight_type)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[_ARCH])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_dir.name)
    _add_hyperparameters(writer, config, file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, model_dir, config.vocab_size, chat_template)
    _write_file(writer, tensors, out_file)
    return out_file


def _outtype_types(outtype: str) -> tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]:
    """The (file type, weight ggml type) pair for ``outtype``."""
    if outtype not in OUTTYPES:
        raise ValueError(f"Cannot export GGUF with outtype {outtype!r}: supported are {', '.join(OUTTYPES)}.")
    return OUTTYPES[outtype]


def _load_llama_config(model_dir: Path) -> LlamaConfig:
    """The model's config, after checking it is a dense LLaMA checkpoint this exporter can write."""
    # Read the raw JSON first: AutoConfig would fail on unknown model types before we could say why.
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    # Configs written without "architectures" still name their model type.
    architectures = raw.get("architectures") or [f"model_type {raw.get('model_type', 'unknown')!r}"]
    is_llama = bool(set(architectures) & set(SUPPORTED_ARCHITECTURES)) or (
        "architectures" not in raw and raw.get("model_type") == "llama"
    )
    if not is_llama:
        raise ValueError(
            f"Cannot export {', '.join(architectures)} to GGUF: only the LLaMA family "
            f"({', '.join(SUPPORTED_ARCHITECTURES)}) is supported."
        )
    if "quantization_config" in raw:
        method = raw["quantization_config"].get("quant_method", "unknown")
        raise ValueError(
            f"Cannot export a {method}-quantized checkpoint to GGUF: it needs dense f16/bf16/f32 weights "
            f"(merge QLoRA adapters into the unquantized base model first)."
        )
    config = LlamaConfig.from_pretrained(model_dir)
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"Cannot export RoPE scaling {rope_type!r} to GGUF: supported are {', '.join(_ROPE_TYPES)}."
        )
    return config


def _rope_parameters(config: LlamaConfig) -> dict[str, Any]:
    """The RoPE settings (``rope_theta``, ``rope_type``, scaling factors) as a plain dict."""
    return dict(config.rope_parameters or {})


# --------------------------------------------------------------------------- hyperparameters


def _add_hyperparameters(writer: gguf.GGUFWriter, config: LlamaConfig, file_type: gguf.LlamaFileType) -> None:
    """Write the ``llama.*`` keys TextModel/LlamaModel.set_gguf_parameters write."""
    rope = _rope_parameters(config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_file_type(file_type)


# --------------------------------------------------------------------------- tensors


def _plan_tensors(
    model_dir: Path, config: LlamaConfig, weight_type: gguf.GGMLQuantizationType
) -> list[_PlannedTensor]:
    """Every tensor the GGUF file will hold, in checkpoint order, with llama.cpp's names and types."""
    name_map = gguf.get_tensor_name_map(_ARCH, config.num_hidden_layers)
    planned = []
    for hf_name, (path, shape) in _checkpoint_tensors(model_dir).items():
        # A tied lm_head is the embedding again; llama.cpp reuses token_embd when output is absent.
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        # Rotary inverse frequencies are recomputed at run time, as llama.cpp's converter assumes.
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"Cannot export tensor {hf_name!r} to GGUF: it has no LLaMA tensor name in llama.cpp.")
        load = partial(_load_in_llama_cpp_layout, path, hf_name, config)
        planned.append(_PlannedTensor(gguf_name, shape, _ggml_type_for(gguf_name, shape, weight_type), load))
    if _rope_parameters(config).get("rope_type") == "llama3":
        planned.append(_rope_freqs_tensor(config))
    return planned


def _checkpoint_tensors(model_dir: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """``{hf_name: (safetensors file, shape)}`` across all shards, without reading tensor data."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        shard_names = ["model.safetensors"]
    else:
        raise ValueError(f"Cannot export {model_dir} to GGUF: it has no model.safetensors (or sharded index).")
    tensors = {}
    for shard_name in shard_names:
        with safe_open(model_dir / shard_name, framework="pt") as shard:
            for name in shard.keys():
                tensors[name] = (model_dir / shard_name, tuple(shard.get_slice(name).get_shape()))
    return tensors


def _ggml_type_for(
    gguf_name: str, shape: tuple[int, ...], weight_type: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """The ggml type llama.cpp's converter stores this tensor in (ModelBase.prepare_tensors)."""
    # llama.cpp's kernels only take F32 for 1-D tensors and norms.
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    # A row that does not fill whole blocks cannot be block-quantized; the converter falls back to F16.
    block_size, _ = gguf.GGML_QUANT_SIZES[weight_type]
    if shape[-1] % block_size:
        return gguf.GGMLQuantizationType.F16
    return weight_type


def _load_in_llama_cpp_layout(path: Path, hf_name: str, config: LlamaConfig) -> np.ndarray:
    """One checkpoint tensor as float32, with Q/K rows permuted as LlamaModel.modify_tensors does."""
    with safe_open(path, framework="pt") as shard:
        tensor = shard.get_tensor(hf_name).to(torch.float32)
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        tensor = _permute_for_rope(tensor, config.num_attention_heads)
    elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        tensor = _permute_for_rope(tensor, config.num_key_value_heads)
    return tensor.numpy()


def _permute_for_rope(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows reordered from HF's rotate-half RoPE layout to llama.cpp's interleaved-pair layout.

    This is llama.cpp's ``LlamaModel.permute(weights, n_head, n_head_kv)`` with the head count
    already resolved (``n_head_kv`` for K when it differs, ``n_head`` for Q).
    """
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope_freqs_tensor(config: LlamaConfig) -> _PlannedTensor:
    """The ``rope_freqs`` tensor through which llama.cpp applies Llama 3 RoPE scaling."""
    factors = _llama3_rope_factors(config)
    return _PlannedTensor(
        gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
        factors.shape,
        gguf.GGMLQuantizationType.F32,
        lambda: factors,
    )


def _llama3_rope_factors(config: LlamaConfig) -> np.ndarray:
    """Per-frequency divisors for Llama 3 RoPE scaling, as LlamaModel.generate_extra_tensors computes them."""
    rope = _rope_parameters(config)
    dim = config.head_dim
    freqs = 1.0 / (rope.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _write_file(writer: gguf.GGUFWriter, tensors: list[_PlannedTensor], out_file: Path) -> None:
    """Write header, metadata and tensors, streaming one tensor at a time; no partial file survives a failure."""
    for tensor in tensors:
        nbytes = math.prod(gguf.quant_shape_to_byte_shape(tensor.shape, tensor.ggml_type))
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), nbytes, raw_dtype=tensor.ggml_type)
    partial_file = out_file.with_name(out_file.name + ".partial")
    try:
        writer.write_header_to_file(path=partial_file)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tensors:
            writer.write_tensor_data(gguf.quants.quantize(tensor.load(), tensor.ggml_type))
        writer.close()
        partial_file.replace(out_file)
    finally:
        writer.close()  # a no-op after the clean close above; releases the file after an error
        partial_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------- tokenizer


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, chat_template: str | None) -> None:
    """Write ``tokenizer.ggml.*`` and ``tokenizer.chat_template``, as LlamaModel.set_vocab does."""
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
