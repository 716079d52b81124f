"""Which inference engine a server runs (`serve_backend`), built from the settings."""

from __future__ import annotations

import logging
from typing import Callable

from tunehouse.settings import Settings

log = logging.getLogger("tunehouse.serve")


def choose(settings: Settings):
    """(backend name, llama-server path or None, why) for these settings on this machine."""
    from tunehouse.serve.llama_server import find_llama_server

    if settings.serve_backend == "torch":
        return "torch", None, "serve_backend=torch"
    binary = find_llama_server(settings.llama_server)  # a wrong explicit path is an error
    if settings.serve_backend == "llama.cpp":
        if binary is None:
            raise FileNotFoundError("serve_backend=llama.cpp, but no llama-server was found: build one with "
                                    "`make llama-server`, or set TUNEHOUSE_LLAMA_SERVER to one")
        return "llama.cpp", binary, "serve_backend=llama.cpp"
    import torch

    if torch.cuda.is_available():
        return "torch", None, "auto: a GPU is present"
    if binary is None:
        return "torch", None, "auto: no llama-server found (`make llama-server` builds one; it decodes faster on a CPU)"
    return "llama.cpp", binary, f"auto: no GPU, llama-server at {binary}"


def build_engine(settings: Settings, cores_shared: Callable[[], bool] | None = None):
    """The Engine for these settings: the torch engine, or the llama.cpp one wrapping it."""
    from tunehouse.serve.engine import TorchEngine

    name, binary, why = choose(settings)
    s = settings
    torch_engine = TorchEngine(max_batch_size=s.serve_max_batch_size, max_models=s.serve_max_loaded_models,
                               max_adapters=s.serve_max_loaded_adapters, dtype=s.serve_dtype,
                               threads=s.serve_threads, adapter_memory_mb=s.serve_adapter_memory_mb,
                               cores_shared=cores_shared)
    log.info("inference backend: %s (%s)", name, why)
    if name == "torch":
        return torch_engine
    from tunehouse.serve.llama_engine import LlamaCppEngine

    return LlamaCppEngine(binary, s.home.expanduser() / "cache" / "gguf", torch_engine, slots=s.serve_max_batch_size,
                          threads=s.serve_threads, dtype=s.serve_dtype, max_models=s.serve_max_loaded_models,
                          max_adapters=s.serve_max_loaded_adapters, kv_tokens=s.serve_llama_kv_tokens,
                          cores_shared=cores_shared)
