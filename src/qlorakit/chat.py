"""Generate and chat in the run's own prompt format (the token sequence the model was trained on)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig, load_run_config
from .data.formats import Message
from .data.templates import stop_text
from .data.tokenize import prompt_ids
from .errors import UserError


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kw.update(do_sample=False)
        return kw


def load_run(run_dir: str | Path, device: torch.device | None = None):
    """(peft model on its quantized base, tokenizer, run config) from a run directory or one of its checkpoints."""
    from peft import PeftModel

    from .model.load import apply_cache_dequantized, load_base_model, load_tokenizer
    from .options import run_files

    run_dir = Path(run_dir)
    adapter_cfg, cfg_dir, tok_dir = run_files(run_dir)
    cfg = load_run_config(cfg_dir)
    base_path = adapter_cfg["base_model_name_or_path"]
    tokenizer = load_tokenizer(str(tok_dir), cfg.trust_remote_code)
    base = load_base_model(base_path, bits=cfg.bits, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                           bf16=cfg.use_bf16(), trust_remote_code=cfg.trust_remote_code, device=device)
    # Inference dequantizes every 4-bit weight on every decoding step; where the run cached them, do so here too.
    dtype = torch.bfloat16 if cfg.use_bf16() else torch.float32
    apply_cache_dequantized(base, cfg.cache_dequantized, cfg.bits, dtype, next(base.parameters()).device)
    model = PeftModel.from_pretrained(base, str(run_dir))
    model.eval()
    return model, tokenizer, cfg


def stop_token_ids(tokenizer, prompt_format: str) -> list[int]:
    ids = {tokenizer.eos_token_id}
    stop = stop_text(prompt_format, tokenizer)
    tid = tokenizer.convert_tokens_to_ids(stop) if stop else None
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _cut_at_stop(text: str, stop: str) -> str:
    return text.split(stop, 1)[0] if stop and stop in text else text


@torch.no_grad()
def generate_replies(model, tokenizer, prompt_format: str, conversations: list[list[Message]],
                     sampling: Sampling | None = None, batch_size: int = 8) -> list[str]:
    """One reply per conversation (each ending on a user turn), batched with left padding."""
    sampling = sampling or Sampling()
    stop_ids, stop = stop_token_ids(tokenizer, prompt_format), stop_text(prompt_format, tokenizer)
    device = next(model.parameters()).device
    replies = []
    for s in range(0, len(conversations), batch_size):
        chunk = [prompt_ids(c, tokenizer, prompt_format) for c in conversations[s:s + batch_size]]
        width = max(map(len, chunk))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_compute_bf16(model)):
            out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=stop_ids, pad_token_id=pad,
                                 **sampling.generate_kwargs())
        for row in out[:, width:]:
            replies.append(_cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop).strip())
    return replies


def _compute_bf16(model) -> bool:
    return any(p.dtype == torch.bfloat16 for p in model.parameters())


def stream_reply(model, tokenizer, prompt_format: str, history: list[Message], sampling: Sampling,
                 out=sys.stdout) -> str:
    """Generate the next assistant turn for ``history``, printing tokens as they come."""
    from transformers import TextIteratorStreamer
    import threading

    ids = torch.tensor([prompt_ids(history, tokenizer, prompt_format)], device=next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop_ids, stop = stop_token_ids(tokenizer, prompt_format), stop_text(prompt_format, tokenizer)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=stop_ids,
                  pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling.generate_kwargs())

    def run():
        with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=_compute_bf16(model)):
            model.generate(**kwargs)

    thread = threading.Thread(target=run)
    thread.start()
    text = ""
    for piece in streamer:
        shown = _cut_at_stop(text + piece, stop)
        out.write(shown[len(text):])
        out.flush()
        text = shown
    thread.join()
    out.write("\n")
    out.flush()
    return _cut_at_stop(text, stop).strip()


def _parse_sampling(argv: list[str], usage: str, extra: dict[str, str] | None = None
                    ) -> tuple[Path, Sampling, dict[str, str]]:
    """RUN_DIR, the sampling options, and the other ``--key value`` options named in ``extra`` (their defaults)."""
    from .options import run_options

    s = Sampling()
    fields = list(Sampling.__dataclass_fields__)
    run_dir, opts = run_options(argv, {**{f: str(getattr(s, f)) for f in fields}, **(extra or {})}, usage)
    for f in fields:
        typ, value = type(getattr(s, f)), opts.pop(f)
        try:
            setattr(s, f, typ(value))
        except ValueError:
            raise UserError(f"--{f}: {value!r} is not {'an integer' if typ is int else 'a number'}") from None
    return run_dir, s, opts


def chat_main(argv: list[str]) -> int:
    """``qlorakit chat RUN_DIR [--temperature 0.7 --max_new_tokens 256 --system TEXT]``."""
    usage = "usage: qlorakit chat RUN_DIR [--temperature T --top_p P --top_k K --max_new_tokens N " \
            "--repetition_penalty R --system TEXT]"
    run_dir, sampling, extra = _parse_sampling(argv, usage, {"system": ""})
    model, tokenizer, cfg = load_run(run_dir)
    history: list[Message] = [Message("system", extra["system"])] if extra["system"] else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"qlorakit chat: {cfg.prompt_format} format; /reset clears the history, /quit or Ctrl-D ends.")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = history[:1] if history and history[0].role == "system" else []
            continue
        history.append(Message("user", line))
        if interactive:
            print("assistant> ", end="", flush=True)
        reply = stream_reply(model, tokenizer, cfg.prompt_format, history, sampling)
        history.append(Message("assistant", reply))
    return 0


def generate_main(argv: list[str]) -> int:
    """``qlorakit generate RUN_DIR --input prompts.jsonl --output answers.jsonl [sampling options]``."""
    usage = "usage: qlorakit generate RUN_DIR --input FILE --output FILE [--batch_size N] [sampling options]"
    run_dir, sampling, extra = _parse_sampling(argv, usage, {"input": "", "output": "", "batch_size": "8"})
    if not extra["input"] or not extra["output"]:
        raise UserError("generate: --input FILE and --output FILE are both needed")
    from .data.formats import read_prompts

    prompts = read_prompts(Path(extra["input"]))
    model, tokenizer, cfg = load_run(run_dir)
    try:
        bs = int(extra["batch_size"])
    except ValueError:
        raise UserError(f"--batch_size: {extra['batch_size']!r} is not an integer") from None
    replies = generate_replies(model, tokenizer, cfg.prompt_format, [p.messages for p in prompts], sampling, bs)
    with open(extra["output"], "w", encoding="utf-8") as f:
        for p, r in zip(prompts, replies):
            f.write(json.dumps({**p.row, "generated": r}, ensure_ascii=False) + "\n")
    print(f"qlorakit generate: {len(replies)} replies written to {extra['output']}", file=sys.stderr)
    return 0
