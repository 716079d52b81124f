"""Dedicated endpoints: one model loaded in its own process, driven through the 1.x shapes
(raw httpx and the together 1.x SDK), with chat requests naming the endpoint proxied to it."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from conftest import _serve, sdk_env, require_together1
from test_api_files_v1_and_clis import run_v1
from tunehouse.errors import InvalidInput
from tunehouse.serve.hardware import Devices, hardware_options, local_devices, match_hardware
from tunehouse.settings import Settings

TINY = "tunehouse/tiny-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_cache):
    live, bg = _serve(Settings(home=tmp_path_factory.mktemp("endpoints") / "home", model_cache=model_cache,
                               embedded_worker=False))
    yield live
    bg.stop()


def _h(live):
    return {"Authorization": f"Bearer {live.key}"}


def _wait_state(live, ep_id: str, state: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ep = httpx.get(f"{live.url}/v1/endpoints/{ep_id}", headers=_h(live)).json()
        if ep["state"] == state:
            return ep
        assert ep["state"] not in ("FAILED", "ERROR"), ep
        time.sleep(0.2)
    raise AssertionError(f"endpoint never reached {state}: {ep}")


def _chat(live, model: str):
    return httpx.post(f"{live.url}/v1/chat/completions", headers=_h(live), timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5,
                            "temperature": 0})


def test_endpoint_lifecycle_and_routing(server):
    hw = httpx.get(f"{server.url}/v1/hardware", headers=_h(server)).json()["data"]
    assert "1x_cpu" in [h["id"] for h in hw] and all(h["object"] == "hardware" for h in hw)
    bad = httpx.post(f"{server.url}/v1/endpoints", headers=_h(server), json={"model": TINY, "hardware": "8x_h100"})
    assert bad.status_code == 400 and "invalid hardware provided" in bad.json()["error"]["message"]

    r = httpx.post(f"{server.url}/v1/endpoints", headers=_h(server), timeout=60,  # may build the tiny model
                   json={"model": TINY, "hardware": "1x_cpu", "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                         "display_name": "tiny", "inactive_timeout": 0})
    assert r.status_code == 200, r.text
    ep = r.json()
    assert ep["object"] == "endpoint" and ep["type"] == "dedicated" and ep["state"] in ("PENDING", "STARTING")
    started = _wait_state(server, ep["id"], "STARTED")
    pid = server.app.state.supervisor.procs[ep["id"]].pid

    answer = _chat(server, ep["name"])
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == ep["name"] and answer.json()["choices"][0]["message"]["content"]
    other = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {server.other_key}"},
                       json={"model": ep["name"], "messages": [{"role": "user", "content": "hi"}]})
    assert other.status_code == 404, "another owner cannot use (or see) the endpoint"

    httpx.patch(f"{server.url}/v1/endpoints/{ep['id']}", headers=_h(server), json={"state": "STOPPED"})
    _wait_state(server, ep["id"], "STOPPED")
    refused = _chat(server, ep["name"])
    assert refused.status_code == 400 and "STOPPED" in refused.json()["error"]["message"]
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)

    httpx.patch(f"{server.url}/v1/endpoints/{ep['id']}", headers=_h(server), json={"state": "STARTED"})
    _wait_state(server, ep["id"], "STARTED")
    assert _chat(server, ep["name"]).status_code == 200
    assert started["autoscaling"] == {"min_replicas": 1, "max_replicas": 1}

    gone = httpx.delete(f"{server.url}/v1/endpoints/{ep['id']}", headers=_h(server))
    assert gone.status_code == 204 and gone.content == b""
    assert httpx.get(f"{server.url}/v1/endpoints/{ep['id']}", headers=_h(server)).status_code == 404


def test_v1_sdk_endpoint_shapes(server):
    v1 = require_together1()
    res = run_v1(v1, server, f"""
        c = Together()
        ep = c.endpoints.create(model={TINY!r}, hardware="1x_cpu", min_replicas=1, max_replicas=1,
                                display_name="v1", state="STOPPED")
        got = c.endpoints.get(ep.id)
        listed = [e.id for e in c.endpoints.list()]
        hw = [h.id for h in c.endpoints.list_hardware()]
        c.endpoints.delete(ep.id)
        print(json.dumps(dict(id=ep.id, state=str(got.state), listed=ep.id in listed, hw=hw)))
    """)
    assert res["listed"] and "1x_cpu" in res["hw"]


# -- hardware and replicas: matched to this machine, or refused with the reason ------------------
CPU_ONLY = Devices(gpu=None, count=0, gpu_memory_gib=0, cpu_cores=2, ram_gib=8)
EIGHT_H100 = Devices(gpu="nvidia_h100_80gb_hbm3", count=8, gpu_memory_gib=80, cpu_cores=64, ram_gib=1024)


@pytest.mark.parametrize("devices, requested, expected", [
    (CPU_ONLY, "1x_cpu", "1x_cpu"),
    (CPU_ONLY, "4x_nvidia_h100_80gb_sxm",
     "invalid hardware provided: '4x_nvidia_h100_80gb_sxm': this server has no GPU, only the CPU. Use one of: 1x_cpu."),
    (CPU_ONLY, "h100",
     "invalid hardware provided: 'h100' is not a hardware id (`<count>x_<gpu>`, e.g. 1x_cpu). Use one of: 1x_cpu."),
    # The 1.x CLI's names (`--gpu h100` → nvidia_h100_80gb_sxm) match torch's name of the same GPU.
    (EIGHT_H100, "1x_nvidia_h100_80gb_sxm", "1x_nvidia_h100_80gb_hbm3"),
    (EIGHT_H100, "1x_nvidia_h100_80gb_hbm3", "1x_nvidia_h100_80gb_hbm3"),
    (EIGHT_H100, "1x_cpu", "1x_cpu"),
    (EIGHT_H100, "4x_nvidia_h100_80gb_sxm",
     "invalid hardware provided: '4x_nvidia_h100_80gb_sxm': an endpoint runs its model on one GPU here (the engine "
     "does not split a model across GPUs). Use 1x_nvidia_h100_80gb_hbm3."),
    (EIGHT_H100, "1x_nvidia_h200_140gb_sxm",
     "invalid hardware provided: '1x_nvidia_h200_140gb_sxm': this server has 8 × nvidia_h100_80gb_hbm3 GPUs and the "
     "CPU. Use one of: 1x_nvidia_h100_80gb_hbm3, 1x_cpu."),
    (EIGHT_H100, "1x_nvidia_l40",  # l40 is not l40s, nor h100: whole name tokens are compared
     "invalid hardware provided: '1x_nvidia_l40': this server has 8 × nvidia_h100_80gb_hbm3 GPUs and the CPU. "
     "Use one of: 1x_nvidia_h100_80gb_hbm3, 1x_cpu."),
])
def test_hardware_matching(devices, requested, expected):
    if expected.startswith("invalid"):
        with pytest.raises(InvalidInput) as exc:
            match_hardware(requested, devices)
        assert exc.value.message == expected and exc.value.param == "hardware"
    else:
        assert match_hardware(requested, devices) == expected
    assert [h["id"] for h in hardware_options(devices)] == (
        ["1x_nvidia_h100_80gb_hbm3", "1x_cpu"] if devices.gpu else ["1x_cpu"])


def test_endpoint_hardware_and_replicas_refused_over_http(server):
    if local_devices().gpu is not None:
        pytest.skip("the CPU-only refusal is for machines without a GPU")
    before = httpx.get(f"{server.url}/v1/endpoints", headers=_h(server)).json()["data"]
    r = httpx.post(f"{server.url}/v1/endpoints", headers=_h(server), timeout=60,
                   json={"model": TINY, "hardware": "4x_nvidia_h100_80gb_sxm", "state": "STOPPED"})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "invalid hardware provided: '4x_nvidia_h100_80gb_sxm': this server has no GPU, only the CPU. "
                   "Use one of: 1x_cpu.", "type": "invalid_request_error", "param": "hardware", "code": None}
    r = httpx.post(f"{server.url}/v1/endpoints", headers=_h(server), timeout=60,
                   json={"model": TINY, "hardware": "1x_cpu", "state": "STOPPED",
                         "autoscaling": {"min_replicas": 1, "max_replicas": 2}})
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "autoscaling.max_replicas must be 1; got 2. An endpoint runs as one process on one device, which batches "
        "concurrent requests itself; replicas are not implemented.")
    assert httpx.get(f"{server.url}/v1/endpoints", headers=_h(server)).json()["data"] == before, "nothing created"


def test_v1_cli_gpu_flags_are_refused_with_the_options(server, v1_python):
    if local_devices().gpu is not None:
        pytest.skip("the CPU-only refusal is for machines without a GPU")
    cli = str(v1_python.parent / "together")
    out = subprocess.run([cli, "--base-url", server.url + "/v1", "--api-key", server.key, "endpoints", "create",
                          "--model", TINY, "--gpu", "h100", "--gpu-count", "4", "--no-auto-start", "--no-wait"],
                         capture_output=True, text=True, env=sdk_env(server), timeout=120)
    # The CLI recognises "invalid hardware provided", says so and lists what GET /hardware offers.
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Invalid hardware selected." in out.stderr and "1x_cpu" in out.stdout
    assert "nvidia_h100" not in out.stdout


def test_availability_zone_is_this_machine(server):
    zones = httpx.get(f"{server.url}/v1/clusters/availability-zones", headers=_h(server)).json()
    assert zones == {"avzones": ["local"]}
    r = httpx.post(f"{server.url}/v1/endpoints", headers=_h(server), timeout=60,
                   json={"model": TINY, "hardware": "1x_cpu", "state": "STOPPED", "availability_zone": "us-east-1a"})
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "availability_zone must be one of local (this server's machine); got 'us-east-1a'.")
