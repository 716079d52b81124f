"""llama.cpp's `llama-server`: found or built, and run as a child process on a loopback port.

The CPU serving backend (`serve/llama_engine.py`) and `bench/serve.py` both run it.

- **Where the binary comes from** (`find_llama_server`): the `llama_server` setting, else the one
  `ensure_llama_server` builds (`make llama-server`, `python -m tunehouse.serve.llama_server`)
  from the llama.cpp that the llama-cpp-python sdist vendors, with a small streaming patch,
  cached in `~/.cache/tunehouse/llama.cpp-VERSION-th1/`.
- **The build** (9 min on 2 idle cores, 26 on busy ones; at nice 10) happens in a temporary folder
  beside the cache and is renamed into place at the end, so an interrupted build leaves nothing
  half-made and a later run reuses the binary.
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
from pathlib import Path

import httpx

from tunehouse.parent_death import die_with_parent

VERSION = "0.3.36"  # llama-cpp-python release whose vendored llama.cpp is built
BUILD = f"llama.cpp-{VERSION}-th1"  # the cache folder: the version and tunehouse's patch
CACHE = Path.home() / ".cache" / "tunehouse"
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


# llama-server streams a token only once the text so far is whole UTF-8: a token that ends inside
# a character is sent with the next one as text, but its id and log-probs are never sent. The
# serving backend decodes token ids itself, so every token must arrive: this sends such a token
# alone, with empty text (the text still comes whole with the token that completes it).
PATCH_FILE = "tools/server/server-context.cpp"
PATCH_ANCHOR = """        if (incomplete) {
            slot.has_next_token = true;
        }
"""
PATCH = """        if (incomplete) {
            slot.has_next_token = true;
            if (slot.task->params.stream && slot.task->params.return_tokens) {  // tunehouse
                result.text_to_send = "";
                send_partial_response(slot, result, false);
            }
        }
"""


def patch_source(src: Path) -> None:
    path = Path(src) / PATCH_FILE
    text = path.read_text()
    if text.count(PATCH_ANCHOR) != 1:
        raise RuntimeError(f"{PATCH_FILE} changed: tunehouse's token-streaming patch no longer applies")
    path.write_text(text.replace(PATCH_ANCHOR, PATCH))


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


def ensure_llama_server(cache_dir: Path = CACHE, progress: Callable[[str], None] = print) -> Path:
    """Path of a `llama-server` built from the llama.cpp that llama-cpp-python VERSION vendors, cached
    in `cache_dir/llama.cpp-VERSION/` beside a build.json saying how it was built."""
    final = Path(cache_dir) / BUILD
    if (final / "llama-server").is_file():
        return final / "llama-server"
    final.parent.mkdir(parents=True, exist_ok=True)
    sdist = _sdist(final.parent / "downloads", progress)
    work = Path(tempfile.mkdtemp(prefix=f".llama.cpp-{VERSION}-", dir=final.parent))
    log = final.parent / f"{BUILD}-build.log"  # outside `work`, so it outlives a failure
    log.unlink(missing_ok=True)
    try:
        cpus = os.cpu_count() or 1
        progress(f"building llama-server from {sdist.name} on {cpus} CPU(s) (9 min on 2 idle cores); log in {log}")
        start = time.monotonic()
        src = _extract_llama_cpp(sdist, work)
        patch_source(src)
        build = work / "build"
        _run_logged(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], log, progress, "cmake")
        _run_logged(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(cpus)], log, progress,
                    "llama-server build")
        install(build, final, {"sdist": sdist.name, "cmake_flags": CMAKE_FLAGS, "jobs": cpus, "patch": PATCH_FILE,
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


def find_llama_server(setting: str | Path | None = None, cache_dir: Path = CACHE) -> Path | None:
    """The llama-server to run: `setting` (the `llama_server` setting; an error if it is not an
    executable), else the one `ensure_llama_server` built; None if there is none. A stock
    llama-server on PATH is not picked up: it lacks the streaming patch (see PATCH) and fails
    requests whose tokens end inside a character; name one in the setting to use it anyway."""
    if setting:
        path = Path(setting).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"llama_server={setting} is not an executable file; build one with "
                                    "`make llama-server` or unset it")
        return path
    built = Path(cache_dir) / BUILD / "llama-server"
    return built if built.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A `llama-server` process on a free loopback port, started by `start()` (or `with`) and
    stopped by `stop()`. LoRA adapters are loaded at start, not applied
    (`--lora-init-without-apply`): a request names the scale of each (`lora_scales`).

    `ctx` is the KV cache in tokens; with `unified` (the default) every slot draws on all of it,
    so one long request can use the whole context while many short ones share it. `flash_attn`
    "off" for f32 weights: on a CPU llama.cpp's flash attention rounds through f16 (the tiny
    model's next-token log-probs moved by 0.0066 with it, 0.000004 without)."""

    def __init__(self, binary: Path, model: Path, *, threads: int, slots: int, ctx: int,
                 cache_type: str | None = None, loras: list[Path] = (), unified: bool = True,
                 prompt_cache: bool = True, flash_attn: str = "auto", log_dir: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model, self.loras = Path(model), [Path(a) for a in loras]
        self.settings = {"threads": threads, "threads_batch": threads, "slots": slots, "ctx": ctx,
                         "unified KV": unified, "KV cache": cache_type or "f16 (default)",
                         "batch/ubatch": "2048/512 (defaults)", "continuous batching": "on (default)",
                         "flash attention": flash_attn,
                         "prompt cache": "on (default)" if prompt_cache else "off (cache_prompt=false, -cram 0)"}
        self.cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                    "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(ctx),
                    "-kvu" if unified else "-no-kvu", "-fa", flash_attn, "--no-webui"]
        if cache_type:
            self.cmd += ["-ctk", cache_type, "-ctv", cache_type]
        if not prompt_cache:  # no host-memory prompt cache: nothing could hit it
            self.cmd += ["-cram", "0"]
        for lora in self.loras:
            self.cmd += ["--lora", str(lora)]
        if loras:
            self.cmd.append("--lora-init-without-apply")
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None

    def lora_scales(self, applied: int | None) -> list[dict]:
        """Every adapter's scale, 1 for `applied`: a request with an empty `lora` list would get the
        start-up scales, which are 1 even with --lora-init-without-apply (server-context.cpp)."""
        return [{"id": i, "scale": float(i == applied)} for i in range(len(self.loras))]

    def start(self, timeout: float = 120) -> LlamaServer:
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False,
                                               dir=self.log_dir)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)  # the engine starts it from an executor thread
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.flush()
                tail = Path(self.log.name).read_text(errors="replace")[-1500:]
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}) at start: {tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"llama-server not healthy after {timeout:.0f} s; see {self.log.name}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
            if self.proc.returncode in (0, -15):  # a clean stop: the log has nothing to keep
                Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    """`make llama-server`: build the binary (once) and print its path."""
    print(find_llama_server(os.environ.get("TUNEHOUSE_LLAMA_SERVER")) if os.environ.get("TUNEHOUSE_LLAMA_SERVER")
          else ensure_llama_server())


if __name__ == "__main__":
    main()
