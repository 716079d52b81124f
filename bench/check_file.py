"""Benchmark: tunehouse's dataset check against the together 1.6.0 SDK's `check_file`.

Generates a chat JSONL of realistic rows (system + user + assistant, 30% multi-turn, replies of
2-12 sentences, ~2 KB a row), checks it with each in its own subprocess, and prints lines/s,
the ratio and peak RSS; the last line is one JSON object with the figures.

    .venv/bin/python bench/check_file.py --size-mb 100 --sdk-python /tmp/v1/bin/python
    .venv/bin/python bench/check_file.py --size-mb 1100   # the >= 1 GB run

`lines_per_s` uses the time of the check_file call itself, measured inside each subprocess
(interpreter start and imports excluded, which favours the SDK: `import together` takes ~0.6 s);
`wall_s` is the whole subprocess. Peak RSS is sampled from /proc over the subprocess and its
children (tunehouse's worker processes), summed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the model learns to answer questions about data pipelines training loss rate token "
         "gradient batch python function returns value error message user assistant system "
         "please explain how why when where what which example result because however config "
         "schedule memory device checkpoint adapter rank alpha dropout warmup epoch step").split()

TUNEHOUSE = """
import json, sys, time
from tunehouse.data.formats import check_file
t = time.perf_counter(); r = check_file(sys.argv[1]); dt = time.perf_counter() - t
print(json.dumps({"passed": r.passed, "lines": r.num_lines, "seconds": dt}))
"""
SDK = """
import json, sys, time, contextlib, io
with contextlib.redirect_stdout(io.StringIO()):  # the 1.x SDK prints a banner on import
    from together.utils import check_file
t = time.perf_counter()
with contextlib.redirect_stderr(io.StringIO()):  # and a tqdm bar while checking
    r = check_file(sys.argv[1])
dt = time.perf_counter() - t
print(json.dumps({"passed": r["is_check_passed"], "lines": r["num_samples"], "seconds": dt}))
"""


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def make_row(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": sentence(rng, 8, 30)}]
    for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 4)):
        messages.append({"role": "user", "content": " ".join(sentence(rng, 6, 20) for _ in range(rng.randint(1, 4)))})
        reply = " ".join(sentence(rng, 8, 25) for _ in range(rng.randint(2, 12)))
        messages.append({"role": "assistant", "content": reply})
    return {"messages": messages}


def generate(path: Path, size_mb: int) -> int:
    rng, written, lines = random.Random(0), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 2**20:
            line = json.dumps(make_row(rng)) + "\n"
            f.write(line)
            written += len(line)
            lines += 1
    return lines


def _tree_rss_kb(pid: int) -> int:
    """RSS of a process and all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/status").read_text().split("VmRSS:")[1].split()[0])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, IndexError, ProcessLookupError):
            pass
    return total


def run(python: str, code: str, path: Path) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen([python, "-c", code, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # the 1.x SDK prints a banner at exit
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_kb(proc.pid))
        time.sleep(0.005)
    wall = time.perf_counter() - t
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{python} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "wall_s": wall, "peak_rss_mb": peak / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--sdk-python", default=os.environ.get(
        "TUNEHOUSE_TOGETHER1_PYTHON", str(ROOT / ".venv-together1/bin/python")))
    ap.add_argument("--out", default=None, help="folder for the generated file (default: a temp dir)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                    help="tunehouse checker processes (default: one per CPU; the library's own default "
                         "also looks at the load average, which the file generation just raised)")
    args = ap.parse_args()
    os.environ["TUNEHOUSE_CHECK_WORKERS"] = str(args.workers)

    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        path = Path(tmp) / "chat.jsonl"
        n = generate(path, args.size_mb)
        print(f"{path.stat().st_size / 2**20:.0f} MB, {n} lines, {path.stat().st_size / n:.0f} bytes/line")
        ours = run(sys.executable, TUNEHOUSE, path)
        sdk = run(args.sdk_python, SDK, path)
    for name, r in (("tunehouse", ours), ("together 1.6.0", sdk)):
        assert r["passed"] and r["lines"] == n, (name, r)
        print(f"{name:15s} {n / r['seconds']:>10,.0f} lines/s  check {r['seconds']:.2f} s  "
              f"wall {r['wall_s']:.2f} s  peak RSS {r['peak_rss_mb']:.0f} MB")
    speedup = sdk["seconds"] / ours["seconds"]
    print(f"speedup {speedup:.2f}x (wall-clock {sdk['wall_s'] / ours['wall_s']:.2f}x)")
    print(json.dumps({
        "size_mb": args.size_mb, "lines": n, "workers": args.workers, "cpus": len(os.sched_getaffinity(0)),
        "tunehouse_lines_per_s": round(n / ours["seconds"]), "sdk_lines_per_s": round(n / sdk["seconds"]),
        "tunehouse_peak_rss_mb": round(ours["peak_rss_mb"], 1), "sdk_peak_rss_mb": round(sdk["peak_rss_mb"], 1),
        "tunehouse_wall_s": round(ours["wall_s"], 3), "sdk_wall_s": round(sdk["wall_s"], 3),
        "speedup": round(speedup, 2), "speedup_wall": round(sdk["wall_s"] / ours["wall_s"], 2),
    }))


if __name__ == "__main__":
    main()
