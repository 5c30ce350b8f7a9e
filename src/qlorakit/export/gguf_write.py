"""qlorakit's own GGUF writer: a Hugging Face checkpoint to a GGUF file in pure Python, with nothing built.

It does what llama.cpp's ``convert_hf_to_gguf.py`` does for the architectures in ``gguf_arch``, using the ``gguf``
package's ``GGUFWriter``:

* the architecture's hyperparameters, named and valued as the converter writes them (``gguf_arch``);
* tensor names from gguf-py's tensor map for that architecture, in the layout llama.cpp expects;
* 1-D tensors and norms kept in F32, every other weight in the chosen type (f32, f16, bf16 or q8_0);
* the tokenizer as ``tokenizer.ggml.*`` metadata (``gguf_vocab``).

Tensors are written one at a time, so memory use stays at about one tensor. The k-quants are not written here:
their mixtures are llama.cpp's quantizer's (``gguf_quantize``).
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import PretrainedConfig

from .gguf_arch import Architecture, resolve_architecture, rope_freqs_factors
from .gguf_vocab import add_tokenizer

__all__ = ["write_gguf", "WRITER_OUTTYPES"]

#: outtype name -> (file type recorded in ``general.file_type``, ggml type of the weight matrices)
WRITER_OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


class _PlannedTensor(NamedTuple):
    """One tensor of the output file: everything the header needs, and how to get its values."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch order
    ggml_type: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # float32 values, already in llama.cpp's layout


def write_gguf(model_dir: str | Path, out_file: str | Path, outtype: str = "f16",
               chat_template: str | None = None, eot_token_id: int | None = None) -> Path:
    """Write the model in ``model_dir`` to the GGUF file ``out_file``, in pure Python.

    Args:
        model_dir: a Hugging Face model directory: ``config.json``, ``*.safetensors``
            (sharded ones with ``model.safetensors.index.json``) and the tokenizer files
            written by ``tokenizer.save_pretrained``.
        out_file: the ``.gguf`` path to write; its parent directory must exist.
        outtype: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` for the weight matrices.
        chat_template: stored as ``tokenizer.chat_template``; defaults to the tokenizer's own.
        eot_token_id: stored as ``tokenizer.ggml.eot_token_id`` (the end of a reply, where it is not EOS).

    Returns:
        ``out_file`` as a ``Path``.

    Raises:
        ValueError: for an outtype this writer does not write, an architecture llama.cpp does not run (or not
            with these settings), a quantized checkpoint, or a tokenizer kind llama.cpp's converter does not handle.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    if outtype not in WRITER_OUTTYPES:
        raise ValueError(f"Cannot export GGUF with outtype {outtype!r} in pure Python: it writes "
                         f"{', '.join(WRITER_OUTTYPES)}.")
    file_type, weight_type = WRITER_OUTTYPES[outtype]
    arch, config = resolve_architecture(model_dir)
    checkpoint = _checkpoint_tensors(model_dir)
    tensors = _plan_tensors(arch, config, checkpoint, weight_type)

    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_dir.name)
    arch.add_hyperparameters(writer, config, {name: shape for name, (_, shape) in checkpoint.items()})
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, model_dir, config.vocab_size, chat_template)
    if eot_token_id is not None:
        writer.add_eot_token_id(eot_token_id)
    _write_file(writer, tensors, out_file)
    return out_file


def _plan_tensors(arch: Architecture, config: PretrainedConfig, checkpoint: dict[str, tuple[Path, tuple[int, ...]]],
                  weight_type: gguf.GGMLQuantizationType) -> list[_PlannedTensor]:
    """Every tensor the GGUF file will hold, in checkpoint order, with llama.cpp's names and types."""
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    planned = []
    for hf_name, (path, shape) in checkpoint.items():
        # A tied lm_head is the embedding again; llama.cpp reuses token_embd when output is absent.
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        # Rotary inverse frequencies are recomputed at run time, as llama.cpp's converter assumes.
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"Cannot export tensor {hf_name!r} to GGUF: it has no {arch.name} tensor name in "
                             f"llama.cpp.")
        load = partial(_load_in_llama_cpp_layout, path, hf_name, arch, config)
        planned.append(_PlannedTensor(gguf_name, shape, _ggml_type_for(gguf_name, shape, weight_type), load))
    factors = rope_freqs_factors(config)
    if factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        planned.append(_PlannedTensor(name, factors.shape, gguf.GGMLQuantizationType.F32, lambda: factors))
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


def _load_in_llama_cpp_layout(path: Path, hf_name: str, arch: Architecture, config: PretrainedConfig) -> np.ndarray:
    """One checkpoint tensor as float32, in the layout llama.cpp's graph for ``arch`` reads."""
    with safe_open(path, framework="pt") as shard:
        tensor = shard.get_tensor(hf_name).to(torch.float32)
    return arch.to_llama_cpp_layout(hf_name, tensor, config).numpy()


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
