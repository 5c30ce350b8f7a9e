"""Export a Hugging Face checkpoint (a merged qlorakit run) to a GGUF file that llama.cpp runs.

Two steps, each done by llama.cpp's own tool where it is installed and by qlorakit otherwise:

1. **convert** the checkpoint to a float (or q8_0) GGUF: llama.cpp's ``convert_hf_to_gguf.py`` where found
   (``gguf_llama_cpp.find_converter``) and it takes the architecture, else qlorakit's pure-Python writer
   (``gguf_write``), which needs nothing built;
2. **quantize** to q8_0 or a k-quant (Q4_K_M, Q5_K_M, Q6_K) with llama.cpp's quantizer
   (``llama_cpp.llama_model_quantize``) from an f32 GGUF. The k-quants need it; q8_0 falls back to gguf-py's
   Q8_0 (the converter's own) when it is missing.

Architectures: the LLaMA family (Llama, Mistral), Qwen2 and MPT (``gguf_arch``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .gguf_arch import ARCHITECTURES, resolve_architecture
from .gguf_llama_cpp import INSTALL_HINT, LLAMA_FTYPES, convert, find_converter, quantize, quantizer_available
from .gguf_write import write_gguf

__all__ = ["export_gguf", "OUTTYPES", "CONVERTERS", "SUPPORTED_ARCHITECTURES"]

#: every outtype, and which of them only llama.cpp's quantizer writes
OUTTYPES = ("f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k", "f32")
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
CONVERTERS = ("auto", "llama.cpp", "python")
SUPPORTED_ARCHITECTURES = tuple(name for arch in ARCHITECTURES for name in arch.hf_classes)

log = logging.getLogger("qlorakit")


def export_gguf(model_dir: str | Path, out_file: str | Path, outtype: str = "f16", chat_template: str | None = None,
                converter: str = "auto", eot_token_id: int | None = None) -> Path:
    """Write the model in ``model_dir`` to the GGUF file ``out_file``.

    Args:
        model_dir: a Hugging Face model directory (``config.json``, safetensors, tokenizer files).
        out_file: the ``.gguf`` path to write; its parent directory must exist.
        outtype: one of ``OUTTYPES`` (case does not matter: ``Q4_K_M`` is ``q4_k_m``).
        chat_template: stored as ``tokenizer.chat_template``; defaults to the tokenizer's own.
        converter: ``"llama.cpp"`` (its ``convert_hf_to_gguf.py``), ``"python"`` (qlorakit's writer) or
            ``"auto"``: llama.cpp's where it is installed and takes this architecture and chat template.
        eot_token_id: stored as ``tokenizer.ggml.eot_token_id`` by qlorakit's writer (llama.cpp's converter leaves
            it to llama.cpp, which takes <|im_end|>, <|eot_id|> and the like for end-of-turn tokens by their text).

    Returns:
        ``out_file`` as a ``Path``.

    Raises:
        ValueError: for an unknown outtype or converter, an architecture or setting llama.cpp does not run, a
            quantized checkpoint, an unsupported tokenizer, a k-quant without llama.cpp, or a failing llama.cpp tool.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise ValueError(f"Cannot export GGUF with outtype {outtype!r}: supported are {', '.join(OUTTYPES)}.")
    if converter not in CONVERTERS:
        raise ValueError(f"Cannot export GGUF with converter {converter!r}: choose {', '.join(CONVERTERS)}.")
    script = _converter_script(converter, model_dir, chat_template)
    use_quantizer = outtype in K_QUANTS or (outtype in LLAMA_FTYPES and quantizer_available())
    if outtype in K_QUANTS and not quantizer_available():
        raise ValueError(f"Cannot export GGUF as {outtype}: the k-quants need llama.cpp's quantizer; {INSTALL_HINT}.")

    def write(float_type: str, target: Path) -> Path:
        if script is not None:
            return convert(script, model_dir, target, float_type)
        return write_gguf(model_dir, target, float_type, chat_template, eot_token_id)

    log.info("GGUF export of %s: %s converter, %s", model_dir, "llama.cpp's" if script else "qlorakit's",
             f"llama.cpp's quantizer to {outtype}" if use_quantizer else f"written as {outtype}")
    if not use_quantizer:
        return write(outtype, out_file)
    source = out_file.with_name(out_file.name + ".f32.partial")
    try:
        write("f32", source)
        return quantize(source, out_file, outtype)
    finally:
        source.unlink(missing_ok=True)


def _converter_script(converter: str, model_dir: Path, chat_template: str | None) -> Path | None:
    """llama.cpp's converter script when it is to be used, None for qlorakit's writer."""
    if converter == "python":
        return None
    arch, _ = resolve_architecture(model_dir)  # refuses what neither converter may write
    script = find_converter()
    if converter == "llama.cpp":
        if script is None:
            raise ValueError("Cannot use llama.cpp's converter: no convert_hf_to_gguf.py in $LLAMA_CPP_DIR or "
                             "<venv>/share/llama.cpp (or sentencepiece is missing); make setup installs it.")
        if not arch.llama_cpp_converter_takes_it:
            raise ValueError(f"Cannot use llama.cpp's converter for {arch.name}: it registers no transformers class "
                             f"for it; --converter python writes it.")
        if chat_template is not None and chat_template != _own_chat_template(model_dir):
            raise ValueError("Cannot set a chat template through llama.cpp's converter: it stores the tokenizer's "
                             "own; save the tokenizer with it first, or use --converter python.")
        return script
    usable = script is not None and arch.llama_cpp_converter_takes_it
    if usable and chat_template is not None and chat_template != _own_chat_template(model_dir):
        usable = False  # only qlorakit's writer can store a different template
    return script if usable else None


def _own_chat_template(model_dir: Path) -> str | None:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).chat_template

