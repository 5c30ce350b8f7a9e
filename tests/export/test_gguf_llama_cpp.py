"""GGUF exports checked by llama.cpp itself (llama-cpp-python, which `make setup` builds from its source package).

Each export of a trained run is loaded by llama.cpp, fed the same token ids as the merged transformers model (the
float32 model the export is written from), and the two must predict the same next token on held-out text; llama.cpp's
own tokenizer must split text as the run's tokenizer does. The tiny models have rows 64 wide, too narrow for the
k-quants' 256-wide super-blocks, so llama.cpp quantizes them with its fallbacks (Q5_0, Q5_1, Q8_0); a tiny Qwen2 with
256-wide rows carries real Q4_K/Q5_K/Q6_K tensors. The README's table, on SmolLM2-135M, is measured by
benchmarks/gguf_agreement.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from helpers import airoboros_rows, write_jsonl
from qlorakit.cli import main
from qlorakit.export.gguf import export_gguf
from qlorakit.export.gguf_llama_cpp import LLAMA_FTYPES, find_converter, quantize
from qlorakit.export.merge import merged_model, save_merged
from qlorakit.export.modelfile import modelfile_path

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed; make setup builds it (pip install -e '.[dev,llama]')")

HELD_OUT = [
    "The committee met on a cold morning to review the harbor lanterns and the state of the old pier.",
    "Rivers carry sediment to the sea, where it settles into layers over centuries.",
    "A binary search halves the interval at every step, so it needs only logarithmic time.",
    "Please remember to water the tomatoes on Tuesday and close the greenhouse at night.",
]
PROBES = ["Hello, world! How are you today?", "naïve café 🙂 def f(x):\n    return x", "  spaces\tand\ttabs  ",
          "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n"]
# f16 and bf16 must predict the merged model's next token at >= 0.97 of the held-out positions. A quantized file moves
# the tiny models' logits by about as much as their two best tokens are apart at a typical position (median gap 0.25;
# on a tiny trained LLaMA, q8_0's misses were all within 0.07 of a tie, the q5_0 fallbacks' within 0.52), so for
# those 0.97 is required where the merged model is decisive: its top-2 gap at least DECISIVE[outtype].
# A broken export (tensor layout, RoPE, ALiBi, tokenizer) fails both by far (test_broken_twin...).
DECISIVE = {"f16": 0.0, "bf16": 0.0, "q8_0": 0.1, "q6_k": 0.25, "q5_k_m": 0.6, "q4_k_m": 0.6}
# q4_k_m's 4-bit fallbacks move a 64-wide tiny model's logits by more than that: of the tiny LLaMA trained by
# conftest's run_dir, 2026-11-30, 4 of 78 positions with a gap >= 0.6 flipped (gaps up to 1.25; 0.949), where an
# earlier run of the same test, before a change of dropout masks, gave >= 0.97. It must keep 0.9 there: a file the
# quantizer broke agrees at about 1 / vocabulary, and layout bugs fail f16 and the unpermuted twin by far.
AGREE = {outtype: 0.9 if outtype == "q4_k_m" else 0.97 for outtype in DECISIVE}
FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_k_m": "MOSTLY_Q4_K_M",
              "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}


def test_llama_cpp_is_built_without_its_amx_kernels():
    """make setup builds llama.cpp with -mno-amx-* (the Makefile's NO_AMX): this pinned llama.cpp's AMX matmul
    segfaults on the embedded model's Q4_1 GGUF and on the Q8_0 exports below (seen on a 2-core AMX Xeon). A CPU
    without AMX never compiles them; on one with AMX this fails first if the flags are lost, before a crash ends
    the whole suite."""
    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info, info


def train_tiny(model_dir: Path, out: Path) -> Path:
    """A few optimizer steps on a tiny model, as tests/conftest.py's run_dir fixture trains one."""
    data = write_jsonl(out.parent / "d.jsonl", airoboros_rows(8))
    assert main(["train", "--model_name_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
                 "--max_steps", "6", "--learning_rate", "0.02", "--max_grad_norm", "1", "--save_strategy", "no",
                 "--eval_strategy", "no", "--bf16", "false"]) == 0
    return out


def llama_cpp_logits(gguf_file: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids``: ``[positions, vocab]``."""
    llm = llama_cpp.Llama(model_path=str(gguf_file), logits_all=True, n_ctx=max(64, len(ids)), n_batch=512,
                          n_threads=2, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def agreement(reference: torch.Tensor, logits: np.ndarray, min_gap: float = 0.0) -> float:
    """Share of positions where both predict the same next token, among those where the reference's two best
    logits are at least ``min_gap`` apart."""
    top2 = reference.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1] >= min_gap).numpy()
    return float((reference.argmax(-1).numpy() == logits.argmax(-1))[decisive].mean())


def file_type(gguf_file: Path) -> str:
    return gguf.LlamaFileType(gguf.GGUFReader(gguf_file).get_field("general.file_type").contents()).name


class Merged:
    """A trained run merged as export does it, with its reference logits on the held-out text."""

    def __init__(self, run_dir: Path, work: Path):
        model, self.tokenizer, cfg = merged_model(run_dir, "dequantized", "fp32")
        self.dir = save_merged(model, self.tokenizer, cfg, work / "merged", run_dir, "dequantized")
        responses = " ".join(r["response"] for r in airoboros_rows(6, seed=5))  # a run's own words, unseen rows
        self.ids = self.tokenizer(" ".join(HELD_OUT) + " " + responses).input_ids
        with torch.no_grad():
            self.reference = model(torch.tensor([self.ids])).logits[0].float()
        self.work = work
        self.files: dict[tuple[str, str], Path] = {}

    def export(self, outtype: str, converter: str = "python") -> Path:
        """The merge exported once per (outtype, converter). The quantized types are quantized from one f32 export,
        as export_gguf quantizes them (the CLI test below runs that whole path)."""
        key = (outtype, converter)
        if key not in self.files:
            out = self.work / f"{outtype}-{converter}.gguf"
            if outtype in LLAMA_FTYPES:
                self.files[key] = quantize(self.export("f32", converter), out, outtype)
            else:
                self.files[key] = export_gguf(self.dir, out, outtype, converter=converter)
        return self.files[key]


@pytest.fixture(scope="module")
def mpt_run(tiny_mpt, tmp_path_factory) -> Path:
    return train_tiny(tiny_mpt, tmp_path_factory.mktemp("mpt_run") / "run")


@pytest.fixture(scope="module")
def merged(run_dir, mpt_run, tmp_path_factory):
    """``arch -> Merged`` for the trained tiny LLaMA (conftest's run_dir) and the trained tiny MPT."""
    runs = {"llama": run_dir, "mpt": mpt_run}
    return {arch: Merged(run, tmp_path_factory.mktemp(f"merged_{arch}")) for arch, run in runs.items()}


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_llama_cpp_predicts_like_the_merged_model_for_every_outtype(arch, merged):
    m = merged[arch]
    results = {}
    for outtype, min_gap in DECISIVE.items():
        gguf_file = m.export(outtype)
        assert file_type(gguf_file) == FILE_TYPES[outtype]
        logits = llama_cpp_logits(gguf_file, m.ids)
        results[outtype] = (agreement(m.reference, logits), agreement(m.reference, logits, min_gap))
    print(f"{arch}: (agreement, where decisive) over {len(m.ids)} positions: {results}")
    for outtype, (overall, decisive) in results.items():
        assert decisive >= AGREE[outtype], (outtype, results)
    assert results["f16"][0] >= 0.97 and results["bf16"][0] >= 0.97
    reader = gguf.GGUFReader(m.export("f16"))
    assert reader.get_field("general.architecture").contents() == arch


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_llama_cpp_tokenizes_like_the_run(arch, merged):
    m = merged[arch]
    llm = llama_cpp.Llama(model_path=str(m.export("f16")), vocab_only=True, verbose=False)
    for text in [*PROBES, HELD_OUT[0]]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == m.tokenizer(text).input_ids, text


def test_broken_twin_unpermuted_q_k_is_caught(merged, monkeypatch):
    # Without the rotate-half -> interleaved permutation, llama.cpp's RoPE rotates the wrong pairs.
    from qlorakit.export import gguf_arch

    monkeypatch.setattr(gguf_arch, "permute_for_rope", lambda weights, n_head: weights)
    m = merged["llama"]
    broken = export_gguf(m.dir, m.work / "unpermuted.gguf", "f16", converter="python")
    assert agreement(m.reference, llama_cpp_logits(broken, m.ids)) < 0.9


@pytest.mark.skipif(find_converter() is None, reason="llama.cpp's convert_hf_to_gguf.py is not installed (make setup "
                                                      "unpacks it into .venv/share/llama.cpp)")
def test_qlorakit_writer_matches_llama_cpp_converter(merged):
    m = merged["llama"]
    ours = gguf.GGUFReader(m.export("f16", converter="python"))
    theirs = gguf.GGUFReader(m.export("f16", converter="llama.cpp"))
    assert {t.name: t.tensor_type.name for t in ours.tensors} == {t.name: t.tensor_type.name for t in theirs.tensors}
    their_data = {t.name: np.asarray(t.data) for t in theirs.tensors}
    for tensor in ours.tensors:
        np.testing.assert_array_equal(np.asarray(tensor.data), their_data[tensor.name], err_msg=tensor.name)
    for key in ("llama.rope.dimension_count", "llama.attention.head_count_kv", "tokenizer.ggml.pre",
                "tokenizer.ggml.model", "tokenizer.chat_template"):
        assert ours.get_field(key).contents() == theirs.get_field(key).contents(), key


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_cli_export_of_a_trained_run_loads_in_llama_cpp_with_its_modelfile(arch, run_dir, mpt_run, tmp_path):
    run = {"llama": run_dir, "mpt": mpt_run}[arch]
    out = tmp_path / f"{arch}-q4_k_m.gguf"
    assert main(["export", str(run), "--format", "gguf", "--outtype", "Q4_K_M", "--output", str(out)]) == 0
    assert file_type(out) == "MOSTLY_Q4_K_M"
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, verbose=False)
    assert llm.metadata["general.architecture"] == arch
    assert f"FROM ./{out.name}" in modelfile_path(out).read_text()
    assert not list(tmp_path.glob("*.partial"))


def tiny_qwen2(tokenizer_dir: Path, out: Path) -> Path:
    """A tiny Qwen2 (Q/K/V biases, NeoX RoPE) with 256-wide rows, so the k-quants are real k-quants."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.1)
    model = Qwen2ForCausalLM(cfg)
    for layer in model.model.layers:  # biases that matter, so a dropped one shows
        torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
        torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_qwen2_exports_load_in_llama_cpp_with_real_k_quants(tokenizer_dir, tmp_path):
    model_dir = tiny_qwen2(tokenizer_dir, tmp_path / "qwen2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    responses = " ".join(r["response"] for r in airoboros_rows(6, seed=5))
    ids = AutoTokenizer.from_pretrained(model_dir)(" ".join(HELD_OUT) + " " + responses).input_ids
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0]
    for outtype, kquant in [("f16", None), ("q4_k_m", "Q4_K"), ("q6_k", "Q6_K")]:
        gguf_file = export_gguf(model_dir, tmp_path / f"qwen2-{outtype}.gguf", outtype, converter="python")
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_file).tensors}
        assert kquant is None or types["blk.0.attn_q.weight"] == kquant, types
        assert types["blk.0.attn_q.bias"] == "F32"
        logits = llama_cpp_logits(gguf_file, ids)
        if outtype == "f16":
            assert agreement(reference, logits) >= 0.97
        # An untrained model's next-token gaps are too small for argmax agreement under 4-6 bit weights; its logits
        # must still follow the reference.
        correlation = np.corrcoef(reference.numpy().ravel(), logits.ravel())[0, 1]
        assert correlation >= 0.8, (outtype, correlation)  # measured: q4_k_m 0.88


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QLORAKIT_RUN_SLOW") != "1",
                    reason="trains SmolLM2-135M for a few steps, then exports it 6 times; set QLORAKIT_RUN_SLOW=1")
def test_trained_smollm2_exports_agree_in_llama_cpp(tmp_path):
    """The embedded SmolLM2-135M, trained a few steps, in every outtype (benchmarks/gguf_agreement.py's run)."""
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "gguf_agreement.py"
    spec = importlib.util.spec_from_file_location("gguf_agreement", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.measure(tmp_path, steps=2)
    by_type = {row["outtype"]: row for row in rows}
    assert by_type["f16"]["agreement"] >= 0.97
    assert by_type["q8_0"]["agreement"] >= 0.95
    assert all(row["agreement"] >= 0.8 for row in rows), rows
