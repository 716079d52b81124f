"""Dedicated endpoints (api-reference §9, the together 1.x shapes): one model kept loaded, with its
LoRA folded in (merged weights), in its own process; chat requests that name the endpoint go to it.

    PENDING → STARTING → STARTED → STOPPING → STOPPED   (FAILED when the process will not come up)

The `Supervisor` thread of the API process drives each endpoint towards its desired state
(STARTED or STOPPED): it spawns `python -m tunehouse.serve.endpoint_proc`, waits for its health
check, stops it on request, on deletion, or after `inactive_timeout` minutes without a request.

An endpoint process lives only as long as the server that started it (the kernel's parent-death
signal, and a watchdog in the child for the race at start-up and for other systems), and answers
only requests that carry the server's internal token (a secret made per server run, passed to the
child in its environment and sent by the proxy in a header): its loopback port is no way around
the API keys.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse.errors import InvalidInput, NotFound, redact_paths
from tunehouse.parent_death import die_with_parent
from tunehouse.serve.hardware import is_cpu, local_devices, match_hardware
from tunehouse.store.blobs import private_dirs
from tunehouse.store.home import Home
from tunehouse.store.tables import Endpoint, utcnow

log = logging.getLogger(__name__)
TOKEN_HEADER = "x-tunehouse-endpoint-token"
TOKEN_ENV = "TUNEHOUSE_ENDPOINT_TOKEN"
PARENT_ENV = "TUNEHOUSE_ENDPOINT_PARENT"  # the server's pid: the child's watchdog exits when it changes
STATES = ("PENDING", "STARTING", "STARTED", "STOPPING", "STOPPED", "FAILED", "ERROR")
START_TIMEOUT_S = 300
ZONES = ("local",)  # this machine: the one zone GET /v1/clusters/availability-zones lists


def _check_replicas(min_r: int, max_r: int) -> None:
    if not 0 <= min_r <= max_r or max_r < 1:
        raise InvalidInput(f"autoscaling needs 0 ≤ min_replicas ≤ max_replicas and max_replicas ≥ 1; "
                           f"got min {min_r}, max {max_r}.", param="autoscaling")
    if max_r > 1:
        # One process per endpoint, on one device: it batches concurrent requests itself (one
        # forward per decoding step for all of them), so a second replica would only pay off on a
        # device of its own, and replicas spread over devices are not implemented.
        raise InvalidInput(f"autoscaling.max_replicas must be 1; got {max_r}. An endpoint runs as one process on "
                           "one device, which batches concurrent requests itself; replicas are not implemented.",
                           param="autoscaling.max_replicas")


def create(s: Session, owner: str, *, model: str, hardware: str, min_replicas: int, max_replicas: int,
           state: str, display_name: str | None, inactive_timeout: int | None,
           availability_zone: str | None = None) -> Endpoint:
    if availability_zone and availability_zone not in ZONES:
        raise InvalidInput(f"availability_zone must be one of {', '.join(ZONES)} (this server's machine); "
                           f"got {availability_zone!r}.", param="availability_zone")
    hardware = match_hardware(hardware)  # what the process will really run on
    _check_replicas(min_replicas, max_replicas)
    if state not in ("STARTED", "STOPPED"):
        raise InvalidInput(f"state must be STARTED or STOPPED; got {state!r}.", param="state")
    ep_id = f"endpoint-{uuid.uuid4()}"
    ep = Endpoint(id=ep_id, owner=owner, name=f"{owner}/{model.rsplit('/', 1)[-1]}-{ep_id[9:17]}",
                  display_name=display_name, model=model, hardware=hardware, min_replicas=min_replicas,
                  max_replicas=max_replicas, inactive_timeout=inactive_timeout, state="PENDING", desired=state)
    s.add(ep)
    s.flush()
    return ep


def get_owned(s: Session, owner: str, ep_id: str) -> Endpoint:
    ep = s.get(Endpoint, ep_id)
    if ep is None or ep.owner != owner:
        raise NotFound(f"No endpoint with id {ep_id!r}.", param="id", code="endpoint_not_found")
    return ep


def by_name(s: Session, name: str) -> Endpoint | None:
    return s.scalar(select(Endpoint).where(Endpoint.name == name))


def list_owned(s: Session, owner: str) -> list[Endpoint]:
    return list(s.scalars(select(Endpoint).where(Endpoint.owner == owner).order_by(Endpoint.created_at)))


def update(s: Session, ep: Endpoint, *, state: str | None, min_replicas: int | None, max_replicas: int | None,
           display_name: str | None, inactive_timeout: int | None) -> Endpoint:
    if min_replicas is not None or max_replicas is not None:
        lo = ep.min_replicas if min_replicas is None else min_replicas
        hi = ep.max_replicas if max_replicas is None else max_replicas
        _check_replicas(lo, hi)
        ep.min_replicas, ep.max_replicas = lo, hi
    if display_name is not None:
        ep.display_name = display_name
    if inactive_timeout is not None:
        ep.inactive_timeout = inactive_timeout
    if state is not None:
        if state not in ("STARTED", "STOPPED"):
            raise InvalidInput(f"state must be STARTED or STOPPED; got {state!r}.", param="state")
        ep.desired = state
        if state == "STARTED" and ep.state in ("STOPPED", "FAILED", "ERROR"):
            ep.state, ep.error = "PENDING", None
    s.flush()
    return ep


def endpoint_object(ep: Endpoint) -> dict:
    from tunehouse.api.schemas import iso

    return {"object": "endpoint", "id": ep.id, "name": ep.name, "display_name": ep.display_name or ep.name,
            "model": ep.model, "hardware": ep.hardware, "type": "dedicated", "owner": ep.owner, "state": ep.state,
            "autoscaling": {"min_replicas": ep.min_replicas, "max_replicas": ep.max_replicas},
            "inactive_timeout": ep.inactive_timeout, "created_at": iso(ep.created_at),
            "error": redact_paths(ep.error) if ep.error else None}  # load errors name weight folders


class Supervisor:
    """Keeps endpoint processes in their desired state (a daemon thread of the API process)."""

    def __init__(self, home: Home, resolve_model_dir, poll_s: float = 0.5):
        self.home, self.resolve_model_dir_fn, self.poll_s = home, resolve_model_dir, poll_s
        self.token = secrets.token_urlsafe(32)
        self.procs: dict[str, subprocess.Popen] = {}
        self.gpu_of: dict[str, int] = {}  # endpoint id → the GPU index its process was given
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self._adopt_after_restart()
        self.thread = threading.Thread(target=self._loop, name="tunehouse-endpoints", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread:
            self.thread.join(30)
        for proc in self.procs.values():
            _terminate(proc)

    def resolve_model_dir(self, s: Session, owner: str, name: str):
        return self.resolve_model_dir_fn(s, owner, name)

    def url(self, ep: Endpoint) -> str:
        return f"http://127.0.0.1:{ep.port}"

    def touch(self, ep_id: str) -> None:
        with self.home.db.session() as s:
            ep = s.get(Endpoint, ep_id)
            if ep is not None:
                ep.last_used_at = utcnow()

    def _adopt_after_restart(self) -> None:
        """Rows left by a previous server run: any process of theirs still alive (a server killed
        where the parent-death signal does not exist) is stopped, and endpoints meant to run are
        started again by this server."""
        with self.home.db.session() as s:
            for ep in s.scalars(select(Endpoint).where(Endpoint.pid.is_not(None))):
                _kill_stray(ep.pid, ep.name)
                ep.pid, ep.port = None, None
                if ep.state in ("PENDING", "STARTING", "STARTED", "STOPPING"):
                    ep.state = "PENDING" if ep.desired == "STARTED" else "STOPPED"

    def _loop(self) -> None:
        # Must not die: the endpoint processes get the parent-death signal when this thread ends.
        while not self.stopping.is_set():
            try:
                with self.home.db.session() as s:
                    for ep in list(s.scalars(select(Endpoint))):
                        self._step(s, ep)
                    known = {ep_id for (ep_id,) in s.execute(select(Endpoint.id))}
                for ep_id in [k for k in self.procs if k not in known]:  # deleted endpoints
                    _terminate(self.procs.pop(ep_id))
            except Exception:
                log.exception("endpoint supervisor step failed; retrying")
            self.wake.wait(self.poll_s)
            self.wake.clear()

    def _step(self, s: Session, ep: Endpoint) -> None:
        proc = self.procs.get(ep.id)
        if ep.desired == "STARTED" and ep.inactive_timeout and ep.state == "STARTED":
            last = ep.last_used_at or ep.updated_at
            if last is not None and _utc(last) < utcnow() - timedelta(minutes=ep.inactive_timeout):
                ep.desired = "STOPPED"  # idle too long
        if ep.desired == "STARTED":
            if ep.state in ("PENDING", "STOPPED") and proc is None:
                self._spawn(s, ep)
            elif ep.state == "STARTING":
                self._check_started(ep, proc)
            elif ep.state == "STARTED" and (proc is None or proc.poll() is not None):
                ep.state, ep.error = "FAILED", "the endpoint process exited"
                self.procs.pop(ep.id, None)
        elif ep.state in ("PENDING", "STARTING", "STARTED"):
            ep.state = "STOPPING"
        elif ep.state == "STOPPING":
            if proc is not None:
                _terminate(self.procs.pop(ep.id))
            ep.state, ep.port, ep.pid = "STOPPED", None, None

    def _spawn(self, s: Session, ep: Endpoint) -> None:
        try:
            model_dir = self.resolve_model_dir(s, ep.owner, ep.model)
        except Exception as exc:  # the model went away (job deleted): say so on the endpoint
            ep.state, ep.error = "FAILED", f"cannot load {ep.model}: {exc}"
            return
        port_file = self.home.settings.run_path / "endpoints" / f"{ep.id}.port"
        private_dirs(port_file.parent)
        port_file.unlink(missing_ok=True)
        log_path = self.home.settings.run_path / "endpoints" / f"{ep.id}.log"
        with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "tunehouse.serve.endpoint_proc",
                                     "--model-dir", str(model_dir), "--name", ep.name, "--port-file", str(port_file)],
                                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent,  # its supervisor thread lives as long as the server
                                    env=dict(os.environ, CUDA_VISIBLE_DEVICES=self._device_for(ep),
                                             TUNEHOUSE_HOME=str(self.home.settings.home),
                                             **{TOKEN_ENV: self.token, PARENT_ENV: str(os.getpid())}))
        self.procs[ep.id] = proc
        ep.state, ep.pid, ep.error, ep.updated_at = "STARTING", proc.pid, None, utcnow()

    def _device_for(self, ep: Endpoint) -> str:
        """CUDA_VISIBLE_DEVICES of the endpoint's process: none for the CPU (the engine would
        otherwise take a GPU it was not given), else the GPU the fewest running endpoints use."""
        self.gpu_of.pop(ep.id, None)
        count = 0 if is_cpu(ep.hardware) else local_devices().count
        if not count:
            return ""
        load = [0] * count
        for other, gpu in self.gpu_of.items():
            if other in self.procs and self.procs[other].poll() is None and gpu < count:
                load[gpu] += 1
        self.gpu_of[ep.id] = load.index(min(load))
        # Indices are torch's, i.e. into the server's own CUDA_VISIBLE_DEVICES when that is set.
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        return visible[self.gpu_of[ep.id]] if len(visible) == count else str(self.gpu_of[ep.id])

    def _check_started(self, ep: Endpoint, proc: subprocess.Popen | None) -> None:
        if proc is None or proc.poll() is not None:
            ep.state, ep.error = "FAILED", "the endpoint process exited while starting"
            self.procs.pop(ep.id, None)
            return
        port_file = self.home.settings.run_path / "endpoints" / f"{ep.id}.port"
        if port_file.exists() and port_file.read_text().strip().isdigit():
            port = int(port_file.read_text())
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", headers={TOKEN_HEADER: self.token},
                             timeout=2).status_code == 200:
                    ep.state, ep.port, ep.last_used_at = "STARTED", port, utcnow()
                    return
            except httpx.TransportError:
                pass
        if _utc(ep.updated_at) < utcnow() - timedelta(seconds=START_TIMEOUT_S):
            _terminate(self.procs.pop(ep.id))
            ep.state, ep.error = "FAILED", f"the endpoint did not start within {START_TIMEOUT_S} s"


def _utc(dt):
    from datetime import timezone

    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


def _kill_stray(pid: int, name: str) -> None:
    """SIGTERM `pid` if it is still the endpoint process serving `name` (pids are reused)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if b"tunehouse.serve.endpoint_proc" in cmd and name.encode() in cmd:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def model_dir_for(s: Session, home: Home, registry, owner: str, name: str) -> Path | str:
    """The weights an endpoint loads for `name`: a registry base model's folder, or a completed
    fine-tuned job's final weights (its merged/ folder for LoRA: dedicated endpoints serve merged)."""
    from tunehouse import jobs
    from tunehouse.store.tables import Job

    try:
        return registry.path(name, s)
    except NotFound:
        pass
    job = s.scalar(select(Job).where(Job.model_output_name == name))
    if job is None or job.owner != owner:
        raise NotFound(f"Unknown model {name!r}: use a base model (GET /v1/fine-tunes/models/supported) or "
                       "the model_output_name of one of your completed jobs.", param="model")
    if job.status != "completed":
        raise InvalidInput(f"Model {name!r} is not ready: its job {job.id} is {job.status}.", param="model")
    final = [c for c in jobs.checkpoints(s, job.id) if c.checkpoint_type == "Final"][-1]
    # this machine's copy from the store (fetched once, cached): merged/ alone for a LoRA job
    merged = f"{final.blob_key}/merged"
    return home.blobs.local_dir(merged if home.blobs.exists(f"{merged}/config.json") else final.blob_key)


def route_for(home: Home, supervisor: Supervisor, owner: str, name: str) -> str | None:
    """The base URL of the endpoint process serving `name` for `owner`; None when `name` is not
    an endpoint (the shared engine serves it); 400 while the endpoint is not STARTED."""
    with home.db.session() as s:
        ep = by_name(s, name)
        if ep is None or ep.owner != owner:
            return None
        if ep.state != "STARTED" or ep.port is None:
            raise InvalidInput(f"Endpoint {ep.name} is {ep.state}; start it (PATCH /v1/endpoints/{ep.id} "
                               '{"state": "STARTED"}) and wait for STARTED.', param="model", code="endpoint_not_ready")
        ep.last_used_at = utcnow()
        return supervisor.url(ep)


async def proxy(url: str, path: str, body: bytes, headers: dict[str, str], token: str):
    """Forward a completion request to an endpoint process, with the server's internal token,
    streaming the answer through."""
    from starlette.background import BackgroundTask
    from starlette.responses import StreamingResponse

    client = httpx.AsyncClient(timeout=None)
    req = client.build_request("POST", url + path, content=body,
                               headers={"content-type": "application/json", TOKEN_HEADER: token,
                                        "user-agent": headers.get("user-agent", "")})
    resp = await client.send(req, stream=True)

    async def close():
        await resp.aclose()
        await client.aclose()

    return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code,
                             media_type=resp.headers.get("content-type"), background=BackgroundTask(close))
