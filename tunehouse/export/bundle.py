"""`checkpoint=gguf` downloads: one folder, as a plain tar, that `ollama create` and llama.cpp use
as unpacked:

    <output-model>-<type>/model-<type>.gguf    the final model (LoRA merged in)
    <output-model>-<type>/adapter-f16.gguf     LoRA jobs: the adapter alone, for the base model's GGUF
    <output-model>-<type>/Modelfile            FROM ./model-<type>.gguf, chat TEMPLATE, stop tokens

Built once per (job, type) into the blob store, like the tar.zst downloads (downloads.py), and
served by the same Range code. Not zstd-compressed: GGUF weights gain ~10% (f16) or nothing (q8_0),
and a plain tar unpacks with any `tar -xf`.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session

from tunehouse.downloads import pick_folder
from tunehouse.errors import InvalidInput
from tunehouse.export.gguf import adapter_type, check_architecture, check_type, write_adapter, write_model
from tunehouse.export.modelfile import modelfile
from tunehouse.job_spec import JobSpec
from tunehouse.store.home import Home
from tunehouse.store.tables import Job


def write_bundle(model_dir: Path, adapter_dir: Path | None, out: Path, gguf_type: str, name: str = "",
                 progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Write the GGUF(s) and the Modelfile into `out`; return the files written."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    check_architecture(config)  # before any work
    files = [write_model(model_dir, out / f"model-{gguf_type}.gguf", gguf_type, name, progress)]
    if adapter_dir is not None:
        files.append(write_adapter(adapter_dir, config, out / f"adapter-{adapter_type(gguf_type)}.gguf",
                                   gguf_type, name))
    tokenizer_config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    template = Path(model_dir) / "chat_template.jinja"
    chat_template = template.read_text() if template.is_file() else tokenizer_config.get("chat_template")
    (out / "Modelfile").write_text(modelfile(files[0].name, chat_template, tokenizer_config.get("eos_token"),
                                             files[1].name if len(files) > 1 else None))
    return files + [out / "Modelfile"]


def build_gguf_download(s: Session, home: Home, job: Job, gguf_type: str | None, step: int | None) -> tuple[str, str]:
    """The blob key of the cached tar for (job, type), built on first use; and its download file name."""
    kind = check_type(gguf_type)
    if step:
        raise InvalidInput("GGUF export is of the final model; leave out checkpoint_step (and :STEP).",
                           param="checkpoint_step")
    model_dir, _ = pick_folder(s, home, job, "default", None)
    name = f"{job.model_output_name.replace('/', '--')}-{kind}"
    key = f"jobs/{job.id}/downloads/gguf-{kind}.tar"
    if home.blobs.exists(key):
        return key, f"{name}.tar"
    adapter_dir = pick_folder(s, home, job, "adapter", None)[0] if JobSpec.of(job).lora else None
    # Staged in the home (it holds the weights already; a big model's GGUF may not fit in /tmp).
    with tempfile.TemporaryDirectory(prefix="gguf-", dir=home.settings.home) as tmp:
        files = write_bundle(model_dir, adapter_dir, Path(tmp), kind, job.model_output_name)
        with home.blobs.writer(key) as w:
            with tarfile.open(fileobj=w, mode="w|") as tar:
                for path in files:
                    tar.add(path, arcname=f"{name}/{path.name}")
            w.commit()
    return key, f"{name}.tar"
