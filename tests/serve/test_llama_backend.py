"""The llama.cpp backend: the GGUF carries the run's prompt format as its chat template, llama.cpp's own Jinja
formatter renders it exactly as qlorakit does for every prompt format, its end-of-reply token stops generation, and
llama-cpp-python's server on the run's GGUF answers the openai client (the GGUF exported on the fly when absent)."""

from __future__ import annotations

import shutil

import openai
import pytest

from qlorakit.data.formats import Conversation, Message
from qlorakit.data.templates import NAMES, chat_template, render_text
from qlorakit.data.tokenize import bos_ids, tokenize_conversation
from qlorakit.export.gguf_llama_cpp import find_converter
from qlorakit.export.merge import end_of_turn_id, merged_model, save_merged
from qlorakit.export.gguf_write import write_gguf
from qlorakit.runs import stop_token_ids

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed; make setup builds it (pip install -e '.[dev,llama]')")
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

TURNS = [Message("system", "You answer briefly."), Message("user", "Name a stone."),
         Message("assistant", "Quartz."), Message("user", "And a river?")]


def training_prompt(tokenizer, fmt: str) -> list[int]:
    """Training's ids for TURNS and a next reply, up to where the reply's trained tokens start."""
    ex = tokenize_conversation(Conversation((*TURNS, Message("assistant", "The harbor river.")), "t"), tokenizer, fmt)
    return ex.input_ids[:len(ex.input_ids) - ex.spans[-1][0]]


@pytest.fixture(scope="module")
def merged(run_dir, tmp_path_factory):
    model, tokenizer, cfg = merged_model(run_dir, "dequantized", "fp32")
    return save_merged(model, tokenizer, cfg, tmp_path_factory.mktemp("merged") / "m", run_dir, "dequantized"), \
        tokenizer


def llama_rendering(gguf_file, messages) -> tuple[str, object]:
    """The prompt llama-cpp-python's server builds for ``messages`` from the GGUF's own template and tokens."""
    llm = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
    text = lambda i: llm._model.token_get_text(i) if i != -1 else ""  # noqa: E731
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=text(llm.token_eos()),
                                    bos_token=text(llm.token_bos()))
    return formatter(messages=[{"role": m.role, "content": m.content} for m in messages]).prompt, llm


@pytest.fixture(scope="module")
def llm(merged, tmp_path_factory):
    gguf_file = write_gguf(merged[0], tmp_path_factory.mktemp("gguf") / "run.gguf", "f32")
    return llama_cpp.Llama(str(gguf_file), n_ctx=512, verbose=False)


def fed_prompts(monkeypatch) -> list:
    """The prompts llama.cpp's completions are given from now on (Llama.create_completion, wrapped)."""
    seen, original = [], llama_cpp.Llama.create_completion

    def capture(self, prompt, *args, **kwargs):
        seen.append(prompt)
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(llama_cpp.Llama, "create_completion", capture)
    return seen


@pytest.mark.parametrize("fmt", NAMES)
def test_llama_cpp_is_fed_the_tokens_training_rendered(llm, merged, fmt, monkeypatch):
    from qlorakit.serve.llama_chat import register_handler

    tokenizer = merged[1]
    seen = fed_prompts(monkeypatch)
    llm.chat_format = register_handler(tokenizer, fmt)
    reply = llm.create_chat_completion([{"role": m.role, "content": m.content} for m in TURNS], max_tokens=2,
                                       temperature=0)
    assert seen == [training_prompt(tokenizer, fmt)] and reply["choices"][0]["finish_reason"]
    # the broken twin, llama-cpp-python's own handler: the template's text tokenized in one piece
    if fmt in ("airoboros", "vicuna", "alpaca", "llama2"):
        joint = llm.tokenize(render_text(TURNS, fmt, tokenizer, add_generation_prompt=True).encode(), add_bos=False,
                             special=True)
        assert joint != seen[0]


@pytest.mark.parametrize("fmt", NAMES)
def test_llama_cpp_renders_the_gguf_template_as_qlorakit_does(merged, fmt, tmp_path):
    model_dir, tokenizer = merged
    for bos in (False, True) if fmt == "chatml" else (False,):  # a tokenizer that adds BOS: the template opens with it
        out = write_gguf(model_dir, tmp_path / f"{fmt}.gguf", "f32", chat_template(fmt, tokenizer, bos=bos),
                         end_of_turn_id(tokenizer, fmt))
        for messages in (TURNS, TURNS[1:2]):
            prompt, llm = llama_rendering(out, messages)
            expected = render_text(messages, fmt, tokenizer, add_generation_prompt=True)
            assert prompt == (tokenizer.bos_token if bos else "") + expected
        for tid in stop_token_ids(tokenizer, fmt):  # the run's end of a reply ends generation in llama.cpp
            assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, tid)


def test_broken_twin_a_template_without_the_system_slot_is_caught(merged, tmp_path):
    model_dir, tokenizer = merged
    wrong = chat_template("airoboros", tokenizer).replace("ns.system = messages[0]['content']", "ns.system = ''")
    prompt, _ = llama_rendering(write_gguf(model_dir, tmp_path / "w.gguf", "f32", wrong), TURNS)
    assert prompt != render_text(TURNS, "airoboros", tokenizer, add_generation_prompt=True)


def test_export_writes_the_run_format_and_the_llama_cpp_server_answers(run_dir, tmp_path, monkeypatch):
    """A copy of the run without a GGUF: the backend exports one into it, then serves it."""
    from qlorakit.serve.command import BackgroundServer, build_app

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    app = build_app("llama.cpp", run, "tiny-run", "test-key", 16)
    exported = list(run.glob("*.gguf"))
    assert [p.name for p in exported] == ["run-f16.gguf"]
    tokenizer = merged_model(run, "dequantized", "fp32")[1]
    prompt, _ = llama_rendering(exported[0], TURNS)
    assert prompt == render_text(TURNS, "airoboros", tokenizer, add_generation_prompt=True)
    assert bos_ids(tokenizer) == []  # so the template has no BOS of its own
    seen = fed_prompts(monkeypatch)
    with BackgroundServer(app) as url:
        client = openai.OpenAI(base_url=url, api_key="test-key", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tiny-run", max_tokens=6, temperature=0,
                                               messages=[{"role": m.role, "content": m.content} for m in TURNS])
        assert isinstance(reply.choices[0].message.content, str) and reply.choices[0].finish_reason
        assert seen == [training_prompt(tokenizer, "airoboros")]  # the server fed training's ids
        chunks = list(client.chat.completions.create(model="tiny-run", max_tokens=6, temperature=0, stream=True,
                                                     messages=[{"role": "user", "content": "Hi"}]))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert client.completions.create(model="tiny-run", prompt="alpha", max_tokens=4).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()


@pytest.mark.skipif(find_converter() is None, reason="llama.cpp's convert_hf_to_gguf.py is not installed")
def test_llama_cpp_converter_stores_the_run_format_too(run_dir, tmp_path):
    from qlorakit.cli import main

    out = tmp_path / "conv.gguf"
    assert main(["export", str(run_dir), "--output", str(out), "--converter", "llama.cpp"]) == 0
    tokenizer = merged_model(run_dir, "dequantized", "fp32")[1]
    prompt, _ = llama_rendering(out, TURNS)
    assert prompt == render_text(TURNS, "airoboros", tokenizer, add_generation_prompt=True)


def test_a_reply_end_other_than_eos_is_the_ggufs_end_of_turn_token(merged, tmp_path):
    import copy

    import gguf

    model_dir, tokenizer = merged
    base = copy.deepcopy(tokenizer)
    base.eos_token = "<|endoftext|>"  # a base whose EOS is not chatml's <|im_end|>
    im_end = base.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(base, "chatml") == im_end and end_of_turn_id(base, "airoboros") is None
    out = write_gguf(model_dir, tmp_path / "eot.gguf", "f32", chat_template("chatml", base), im_end)
    field = gguf.GGUFReader(out).fields["tokenizer.ggml.eot_token_id"]
    assert int(field.parts[field.data[0]][0]) == im_end
