"""llama.cpp's own tools, where they are installed: its quantizer (``llama_cpp.llama_model_quantize`` from the
llama-cpp-python package, which builds the llama.cpp it vendors) and its converter (``convert_hf_to_gguf.py`` from a
llama.cpp tree: ``$LLAMA_CPP_DIR``, or the copy ``make setup`` unpacks into ``<venv>/share/llama.cpp`` from the same
llama-cpp-python source package).

``pip install 'qlorakit[llama]'`` (see the README) installs both the quantizer and what the converter imports.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["LLAMA_FTYPES", "quantizer_available", "quantize", "find_converter", "convert"]

#: outtype -> llama.cpp's ``llama_ftype`` (include/llama.h): what ``llama-quantize`` calls Q8_0, Q4_K_M, ...
LLAMA_FTYPES = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}

INSTALL_HINT = "pip install 'qlorakit[llama]' (the README's GGUF section says how; make setup does it)"


def quantizer_available() -> bool:
    """Whether llama-cpp-python (and so llama.cpp's quantizer) can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def quantize(source: Path, out_file: Path, outtype: str) -> Path:
    """Quantize the f32 (or f16) GGUF ``source`` into ``out_file`` as llama.cpp's ``llama-quantize`` does.

    The k-quant mixtures (which tensors get Q6_K in Q4_K_M, which fall back to Q5_0/Q8_0 where a row is not a whole
    number of 256-wide super-blocks) are llama.cpp's decisions, made in this call.
    """
    if not quantizer_available():
        raise ValueError(f"Cannot quantize GGUF to {outtype}: it needs llama.cpp's quantizer; {INSTALL_HINT}.")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[outtype]
    partial_file = out_file.with_name(out_file.name + ".partial")
    try:
        with _stderr_captured() as log_file:  # a line per tensor, and a warning per fallback, printed by C code
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial_file).encode(),
                                                    ctypes.byref(params))
        if status != 0:
            tail = "\n".join(Path(log_file.name).read_text(errors="replace").strip().splitlines()[-6:])
            raise ValueError(f"llama.cpp's quantizer failed on {source} (status {status}) for {outtype}:\n{tail}")
        partial_file.replace(out_file)
    finally:
        partial_file.unlink(missing_ok=True)
    return out_file


@contextlib.contextmanager
def _stderr_captured():
    """File descriptor 2 (where llama.cpp prints) sent to a temporary file for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log_file:
        os.dup2(log_file.fileno(), 2)
        try:
            yield log_file
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def find_converter() -> Path | None:
    """llama.cpp's ``convert_hf_to_gguf.py``, if one is installed where qlorakit looks, with what it imports."""
    places = [Path(os.environ["LLAMA_CPP_DIR"])] if os.environ.get("LLAMA_CPP_DIR") else []
    places.append(Path(sys.prefix) / "share" / "llama.cpp")
    script = next((place / "convert_hf_to_gguf.py" for place in places
                   if (place / "convert_hf_to_gguf.py").is_file()), None)
    # Its LLaMA vocabulary code imports sentencepiece before it looks for a tokenizer.model.
    if script is None or importlib.util.find_spec("sentencepiece") is None:
        return None
    return script


def convert(script: Path, model_dir: Path, out_file: Path, outtype: str) -> Path:
    """Run llama.cpp's converter on ``model_dir``, writing ``out_file`` (``outtype`` f32, f16, bf16 or q8_0)."""
    partial_file = out_file.with_name(out_file.name + ".partial")
    command = [sys.executable, str(script), str(model_dir), "--outfile", str(partial_file), "--outtype", outtype]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=_converter_env())
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-6:])
            raise ValueError(f"llama.cpp's converter ({script}) failed on {model_dir}:\n{tail}\n"
                             f"(--converter python uses qlorakit's own writer instead)")
        partial_file.replace(out_file)
    finally:
        partial_file.unlink(missing_ok=True)
    return out_file


def _converter_env() -> dict[str, str]:
    """The environment the converter runs in: offline (it may not look anything up on a hub), quiet."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env
