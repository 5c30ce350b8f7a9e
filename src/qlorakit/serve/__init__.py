"""``qlorakit serve``: a run (or its GGUF) behind an OpenAI-compatible HTTP API, in the run's own prompt format.

Backends: ``app`` (transformers: base plus adapter, no export), ``llama`` (llama-cpp-python's server on the run's
GGUF, whose chat template is the run's format) and ``vllm`` (the command that starts vLLM's server with the adapter).
``command`` picks one, checks the port and runs the server.
"""
