"""The Files API through the together 1.x SDK (its own venv: strict pydantic, its own error
parsing) and through both official CLIs and tunehouse's own CLI."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import BACKENDS, DATA, bin_path, sdk_env

pytestmark = pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
CHAT = DATA / "api" / "chat.jsonl"


def run_v1(v1_python: Path, live, code: str, key: str | None = None) -> dict:
    """Run `code` with together 1.6.0; it must print one JSON object as its last line."""
    script = "import json, together\nfrom together import Together\n" + textwrap.dedent(code)
    env = sdk_env(live, key) | {"TOGETHER_BASE_URL": live.url + "/v1"}
    out = subprocess.run([str(v1_python), "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_v1_sdk_files_roundtrip(v1_python, live, tmp_path):
    res = run_v1(v1_python, live, f"""
        c = Together()
        f = c.files.upload({str(CHAT)!r})
        listed = [x.id for x in c.files.list().data]
        got = c.files.retrieve(f.id)
        c.files.retrieve_content(f.id, output={str(tmp_path / "out.jsonl")!r})
        d = c.files.delete(f.id)
        try:
            c.files.retrieve(f.id)
            err = None
        except together.error.InvalidRequestError as e:
            err = type(e).__name__ + ": " + str(e)
        print(json.dumps(dict(id=f.id, listed=f.id in listed, bytes=got.bytes, filename=got.filename,
                              deleted=d.deleted, err=err)))
    """)
    assert res["listed"] and res["deleted"] and res["bytes"] == CHAT.stat().st_size
    assert (tmp_path / "out.jsonl").read_bytes() == CHAT.read_bytes()
    assert res["err"] and res["id"] in res["err"]


def test_v1_sdk_multipart_upload(v1_python, live, tmp_path):
    """together 1.x's multipart path (normally above 5 GB) on 6 MiB in two parts."""
    line = CHAT.read_bytes().splitlines(keepends=True)[0]
    big = tmp_path / "big.jsonl"
    big.write_bytes(line * ((6 << 20) // len(line) + 1))
    res = run_v1(v1_python, live, f"""
        import together.resources.files, together.filemanager
        together.resources.files.MULTIPART_THRESHOLD_GB = 0.001
        together.filemanager.TARGET_PART_SIZE_MB = 5
        M = together.filemanager.MultipartUploadManager
        parts, send = [], M._upload_single_part
        M._upload_single_part = lambda self, info, data: parts.append(len(data)) or send(self, info, data)
        c = Together()
        f = c.files.upload({str(big)!r})
        c.files.retrieve_content(f.id, output={str(tmp_path / "out.jsonl")!r})
        print(json.dumps(dict(id=f.id, bytes=c.files.retrieve(f.id).bytes, parts=parts)))
    """)
    assert res["bytes"] == big.stat().st_size and len(res["parts"]) == 2
    assert (tmp_path / "out.jsonl").read_bytes() == big.read_bytes()


def test_v1_sdk_errors_parse_and_other_owner(v1_python, live):
    f = run_v1(v1_python, live, f"print(json.dumps({{'id': Together().files.upload({str(CHAT)!r}).id}}))")
    res = run_v1(v1_python, live, f"""
        out = {{}}
        for name, call in [("retrieve", lambda: Together().files.retrieve({f['id']!r})),
                           ("bad_key", lambda: Together(api_key="th-nope").files.list())]:
            try:
                call(); out[name] = "no error"
            except Exception as e:
                out[name] = type(e).__name__ + ": " + str(e)
        print(json.dumps(out))
    """, key=None if False else live.other_key)
    assert res["retrieve"].startswith("InvalidRequestError") and f["id"] in res["retrieve"]
    assert res["bad_key"].startswith("AuthenticationError")


def test_v1_local_check_file_agrees_on_user_user(v1_python, live):
    res = run_v1(v1_python, live, f"""
        from together.utils import check_file
        print(json.dumps(check_file({str(DATA / "api" / "user_user.jsonl")!r})))
    """)
    assert res["is_check_passed"] is False and res["line_number"] == 2


def _v3_cli(live, *args, cwd=None):
    return subprocess.run([bin_path("together"), *args], capture_output=True, text=True, env=sdk_env(live),
                          timeout=120, cwd=cwd)


def test_v3_cli_files(live):
    bad = _v3_cli(live, "files", "check", str(DATA / "api" / "not_object.jsonl"))
    assert bad.returncode == 1 and "X" in bad.stdout
    up = _v3_cli(live, "files", "upload", str(CHAT), "--json")
    assert up.returncode == 0, up.stderr
    file_id = json.loads(up.stdout)["id"]
    ls = _v3_cli(live, "files", "list")
    assert ls.returncode == 0 and file_id in ls.stdout
    get = _v3_cli(live, "files", "retrieve", file_id)
    assert get.returncode == 0 and "chat.jsonl" in get.stdout
    rm = _v3_cli(live, "files", "delete", file_id)
    assert rm.returncode == 0, rm.stderr


def test_v1_cli_files(v1_python, live):
    cli = str(v1_python.parent / "together")
    base = ["--base-url", live.url + "/v1", "--api-key", live.key]
    up = subprocess.run([cli, *base, "files", "upload", str(CHAT)], capture_output=True, text=True,
                        env=sdk_env(live), timeout=120)
    assert up.returncode == 0, up.stderr
    file_id = json.loads(up.stdout[up.stdout.index("{"):])["id"]
    ls = subprocess.run([cli, *base, "files", "list"], capture_output=True, text=True, env=sdk_env(live))
    assert ls.returncode == 0 and file_id in ls.stdout, ls.stderr


def _th(live, *args):
    env = sdk_env(live) | {"TUNEHOUSE_BASE_URL": live.url, "TUNEHOUSE_API_KEY": live.key}
    return subprocess.run([bin_path("tunehouse"), *args], capture_output=True, text=True, env=env, timeout=120)


def test_tunehouse_cli_files(live, tmp_path):
    bad = _th(live, "files", "check", str(DATA / "api" / "user_user.jsonl"))
    assert bad.returncode == 1 and "role_alternation" in bad.stdout
    refused = _th(live, "files", "upload", str(DATA / "api" / "user_user.jsonl"))
    assert refused.returncode == 1 and "Not uploaded" in refused.stderr
    up = _th(live, "files", "upload", str(CHAT), "--json")
    assert up.returncode == 0, up.stderr
    file_id = json.loads(up.stdout)["id"]
    assert file_id in _th(live, "files", "list").stdout
    listed = json.loads(_th(live, "files", "list", "--json").stdout)
    assert [f["id"] for f in listed] == [file_id]
    assert json.loads(_th(live, "files", "retrieve", file_id, "--json").stdout)["LineCount"] == 5
    out = tmp_path / "copy.jsonl"
    assert _th(live, "files", "content", file_id, "-o", str(out)).returncode == 0
    assert out.read_bytes() == CHAT.read_bytes()
    assert _th(live, "files", "delete", file_id).returncode == 0
    missing = _th(live, "files", "retrieve", file_id)
    assert missing.returncode == 1 and file_id in missing.stderr
