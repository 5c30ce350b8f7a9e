"""Handing a run over: merged into its base (``merge``), or as a GGUF file for llama.cpp (``gguf``)."""
