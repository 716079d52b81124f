"""llama.cpp's `llama-server` for bench/serve.py: built once from the llama.cpp source that the
llama-cpp-python sdist vendors, then started and driven over HTTP like any client would.

    binary = ensure_llama_server(Path.home() / ".cache/tunehouse-bench")
    with LlamaServer(binary, "model.gguf", threads=2, slots=16, ctx_per_slot=256, cache_type="f32",
                     loras=["adapter.gguf"]) as srv:
        stream = await srv.complete(client, token_ids, tokens=32, lora=0)

The build (21 min on 2 shared cores at nice 10) goes to a temporary folder beside the
cache and is renamed into place at the end, so an interrupted build leaves nothing half-made and a
later run reuses the binary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

VERSION = "0.3.36"  # llama-cpp-python release whose vendored llama.cpp is built
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
# Release build for this CPU (-march=native), one static binary, nothing fetched at build time
# (the prebuilt web UI is downloaded from the hub unless told not to; the bench runs --no-webui).
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               "-DLLAMA_OPENSSL=OFF"]


def _sdist(downloads: Path, progress: Callable[[str], None]) -> Path:
    path = downloads / SDIST
    if not path.is_file():
        progress(f"downloading the llama-cpp-python {VERSION} sdist from PyPI")
        # pip reads the sdist's metadata with its build backend (scikit-build-core), which it
        # installs in an isolated environment for that; nothing is compiled.
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={VERSION}", "-d", str(downloads)], check=True)
    return path


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Unpack vendor/llama.cpp and its git folder (.git/modules/…, whose HEAD names the commit the
    build reports in `--version`); the rest of the sdist is the Python binding."""
    top = f"llama_cpp_python-{VERSION}/"
    wanted = (f"{top}vendor/llama.cpp/", f"{top}.git/modules/vendor/llama.cpp/")
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, members=[m for m in tar.getmembers() if m.name.startswith(wanted)], filter="data")
    return dest / wanted[0]


def _run_logged(cmd: list[str], log: Path, progress: Callable[[str], None], label: str) -> None:
    """Run `cmd` at low priority with its output in `log`; report each 10% that make reports."""
    shown = -10
    with open(log, "a") as out, subprocess.Popen(["nice", "-n", "10", *cmd], stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            out.write(line)
            if (m := re.match(r"\[\s*(\d+)%\]", line)) and int(m[1]) >= shown + 10:
                shown = int(m[1])
                progress(f"{label}: {shown}%")
    if proc.returncode:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}); see {log}")


def ensure_llama_server(cache_dir: Path, progress: Callable[[str], None] = print) -> Path:
    """Path of a `llama-server` built from the llama.cpp that llama-cpp-python VERSION vendors, cached
    in `cache_dir/llama.cpp-VERSION/` beside a build.json saying how it was built."""
    final = Path(cache_dir) / f"llama.cpp-{VERSION}"
    if (final / "llama-server").is_file():
        return final / "llama-server"
    final.parent.mkdir(parents=True, exist_ok=True)
    sdist = _sdist(final.parent / "downloads", progress)
    work = Path(tempfile.mkdtemp(prefix=f".llama.cpp-{VERSION}-", dir=final.parent))
    log = final.parent / f"llama.cpp-{VERSION}-build.log"  # outside `work`, so it outlives a failure
    log.unlink(missing_ok=True)
    try:
        cpus = os.cpu_count() or 1
        progress(f"building llama-server from {sdist.name} on {cpus} CPU(s) (~20 min on 2 cores); log in {log}")
        start = time.monotonic()
        src = _extract_llama_cpp(sdist, work)
        build = work / "build"
        _run_logged(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], log, progress, "cmake")
        _run_logged(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(cpus)], log, progress,
                    "llama-server build")
        install(build, final, {"sdist": sdist.name, "cmake_flags": CMAKE_FLAGS, "jobs": cpus,
                               "build_seconds": round(time.monotonic() - start)})
        progress(f"llama-server built in {time.monotonic() - start:.0f} s: {final / 'llama-server'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final / "llama-server"


def install(build: Path, final: Path, record: dict) -> None:
    """Move the built binary to `final` with build.json (`record` plus its `--version`): both are
    written beside `final` and renamed into place at once."""
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    out.chmod(0o755)  # mkdtemp makes it private; the cache is not
    shutil.copy2(build / "bin" / "llama-server", out / "llama-server")
    version = subprocess.run([str(out / "llama-server"), "--version"], capture_output=True, text=True)
    record["version"] = (version.stdout + version.stderr).strip()
    (out / "build.json").write_text(json.dumps(record, indent=1))
    try:
        out.rename(final)  # atomic; another run may have finished first, and its binary is as good
    except OSError:
        shutil.rmtree(out, ignore_errors=True)
        if not (final / "llama-server").is_file():
            raise


def build_info(binary: Path) -> dict:
    path = Path(binary).parent / "build.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Stream:
    """Client-side timing of one streamed request: perf_counter() at send, first token and end."""

    start: float
    first: float
    end: float
    tokens: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A `llama-server` process on a free loopback port, for as long as the `with` block lasts.
    LoRA adapters are loaded at start (`--lora-init-without-apply`: not applied by default) and
    applied per request, on the same base, like tunehouse's engine does."""

    def __init__(self, binary: Path, model: Path, *, threads: int, slots: int, ctx_per_slot: int,
                 cache_type: str, loras: list[Path] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = {"threads": threads, "threads_batch": threads, "slots": slots,
                         "ctx": slots * ctx_per_slot, "ctx_per_slot": ctx_per_slot, "KV cache": cache_type,
                         "batch/ubatch": "2048/512 (defaults)", "continuous batching": "on (default)",
                         "flash attention": "auto (default)", "prompt cache": "off (cache_prompt=false, -cram 0)"}
        # -ctk/-ctv: the KV cache in the weights' precision, as tunehouse keeps it (llama.cpp's
        # default is f16: with it an f32 model's logits moved by 0.004, with f32 by 0.0000, on the
        # tiny model in tests/test_gguf_export.py). -cram 0: no host-memory prompt cache; with
        # cache_prompt=false nothing could hit it, and saving idle slots into it would only cost copies.
        self.cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                    "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
                    "-ctk", cache_type, "-ctv", cache_type, "-cram", "0", "--no-webui"]
        self.n_loras = len(loras)
        for lora in loras:
            self.cmd += ["--lora", str(lora)]
        if loras:
            self.cmd.append("--lora-init-without-apply")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServer:
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"llama-server not healthy after 120 s; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    async def complete(self, client: httpx.AsyncClient, ids: list[int], tokens: int, lora: int | None = None
                       ) -> Stream:
        """Greedy, exactly `tokens` new tokens after the prompt `ids` (sent as token ids, so both
        engines see the same ones), streamed; `lora`: the id of an adapter to apply at scale 1.
        Every adapter's scale is sent: a request with an empty `lora` list gets the start-up scales,
        which are 1 even with --lora-init-without-apply (server-context.cpp, launch_slot_with_task)."""
        scales = [{"id": i, "scale": float(i == lora)} for i in range(self.n_loras)]
        body = {"prompt": ids, "n_predict": tokens, "temperature": 0, "top_k": 1, "ignore_eos": True,
                "cache_prompt": False, "stream": True, "return_tokens": True, "lora": scales}
        start, first, n = time.perf_counter(), None, 0
        async with client.stream("POST", f"{self.url}/completion", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                got = len(json.loads(line[6:]).get("tokens") or [])
                if got and first is None:
                    first = time.perf_counter()
                n += got
        if n != tokens:
            raise RuntimeError(f"llama-server streamed {n} tokens, not {tokens}")
        return Stream(start, first, time.perf_counter(), n)
