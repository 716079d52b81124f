"""Exports of a job's model for other runtimes: GGUF for llama.cpp and Ollama (`gguf.py` writes
the files, `modelfile.py` the Ollama Modelfile, `bundle.py` builds and caches the download)."""
