"""Benchmark: tunehouse's dataset check against the together SDKs' `check_file`, same file, one run.

Generates a chat JSONL of realistic rows (system + user + assistant, 30% multi-turn, replies of
2-12 sentences, ~2 KB a row) and checks it, each side in its own subprocess, with:

- tunehouse on every CPU (`--workers`, default one process per CPU) and on one process, so a
  reader sees what is parallelism and what is the code;
- together 1.6.0 (`--sdk-python`): the last SDK whose checker does the work tunehouse does
  (JSON, one object per line, format detection, one format per file, keys, types, roles and
  turn order of every row); single process, stdlib json, stops at the first error;
- together 3.1.1 (`--sdk3-python`, the SDK in tunehouse's own venv): the fastest checker a user
  runs today, but it checks less (UTF-8, JSON, one object per line; the format rules moved to
  the server); single process, stdlib json, stops at the first error.

No SDK checker has a parallel or faster mode to turn on. Each side runs `--repeat` times,
interleaved, and its best run counts (the load of a shared machine drifts).

    .venv/bin/python bench/check_file.py --size-mb 100
    .venv/bin/python bench/check_file.py --size-mb 1024   # the 1 GB run

`check_s` (and lines/s) is the check_file call itself, timed inside each subprocess (interpreter
start and imports excluded, which favours the SDKs: `import together` takes ~0.6 s); `wall_s`
is the whole subprocess; `cpu_s` is the user + system time of the check_file call, worker
processes included (the steadier measure on a shared machine: Linux's autogroup gives a session
the same CPU share however many processes it runs, so under load both sides get the same share
and the wall ratio falls to the CPU ratio).
Peak RSS is the whole process tree (tunehouse's worker processes included), sampled from /proc
every 20 ms and summed, and never less than the largest single process's kernel max RSS.
The last line is one JSON object; `speedup` = together 1.6.0 check_s ÷ tunehouse check_s.
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

CPU = """
import resource
def cpu():  # user + system seconds of this process and its finished children (worker processes)
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
"""
TUNEHOUSE = CPU + """
import json, sys, time
from importlib.metadata import version
from tunehouse.data.formats import check_file
if __name__ == "__main__":  # tunehouse's workers may be spawned processes
    workers = int(sys.argv[2])
    c, t = cpu(), time.perf_counter()
    r = check_file(sys.argv[1], workers=workers)
    dt, dc = time.perf_counter() - t, cpu() - c
    print(json.dumps({"passed": r.passed, "lines": r.num_lines, "errors": len(r.problems), "seconds": dt,
                      "check_cpu_s": dc,
                      "version": version("tunehouse"), "msgspec": version("msgspec"),
                      "orjson": version("orjson"), "python": sys.version.split()[0]}))
"""
SDK = CPU + """
import json, sys, time, contextlib, io
from importlib.metadata import version
with contextlib.redirect_stdout(io.StringIO()):  # the 1.x SDK prints a banner on import
    try:
        from together.lib.utils.files import check_file  # 2.x and later
    except ImportError:
        from together.utils import check_file  # 1.x
c, t = cpu(), time.perf_counter()
with contextlib.redirect_stderr(io.StringIO()):  # 1.x shows a tqdm bar while checking
    r = check_file(sys.argv[1])
dt, dc = time.perf_counter() - t, cpu() - c
print(json.dumps({"passed": r["is_check_passed"], "lines": r["num_samples"], "seconds": dt, "check_cpu_s": dc,
                  "version": version("together"), "python": sys.version.split()[0]}))
"""
WHAT = {
    "tunehouse": "UTF-8, JSON, one object per line, format, one format per file, keys, types, roles "
                 "and turn order of every row; lists every error with line and field",
    "together1": "UTF-8, JSON, one object per line, format, one format per file, keys, types, roles "
                 "and turn order of every row; stops at the first error",
    "together3": "UTF-8, JSON, one object per line (format rules left to the server); stops at the "
                 "first error",
}


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


def _tree_rss_kb(pid: int) -> tuple[int, int]:
    """(RSS in KiB, number of processes) of a process and all its descendants, from /proc."""
    total, count, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/status").read_text().split("VmRSS:")[1].split()[0])
            count += 1
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, IndexError, ProcessLookupError):
            pass
    return total, count


def run(python: str, code: str, *args: str) -> dict:
    """One subprocess: its JSON answer plus wall time, CPU time and peak RSS of its tree."""
    t = time.perf_counter()
    proc = subprocess.Popen([python, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # the 1.x SDK prints a banner at exit
    peak = procs = 0
    while True:
        rss, count = _tree_rss_kb(proc.pid)
        peak, procs = max(peak, rss), max(procs, count)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.02)  # RSS is flat on both sides; the kernel max RSS below catches spikes
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{python} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    # wait4's usage covers the subprocess and the children it waited for; ru_maxrss is the
    # largest single process (KiB), a floor for the sampled sum of the tree
    return {**result, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": max(peak, usage.ru_maxrss) / 1024, "processes": procs}


def main() -> None:
    cpus = len(os.sched_getaffinity(0))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--sdk-python", default=os.environ.get(
        "TUNEHOUSE_TOGETHER1_PYTHON", str(ROOT / ".venv-together1/bin/python")),
        help="a Python with together 1.6.0")
    ap.add_argument("--sdk3-python", default=sys.executable,
                    help="a Python with together 3.x (default: this one, tunehouse's venv)")
    ap.add_argument("--workers", type=int, default=cpus,
                    help="tunehouse checker processes (default: one per CPU)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side; the best counts")
    ap.add_argument("--file", default=None, help="reuse this generated file if it exists (else "
                    "write it there and keep it); default: a temporary file, deleted at the end")
    args = ap.parse_args()

    sides = {  # name -> (python, code, extra args)
        "tunehouse": (sys.executable, TUNEHOUSE, str(args.workers)),
        "tunehouse_1proc": (sys.executable, TUNEHOUSE, "1"),
        "together1": (args.sdk_python, SDK),
        "together3": (args.sdk3_python, SDK),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.file or Path(tmp) / "chat.jsonl")
        if path.exists():
            n = sum(1 for _ in open(path, "rb"))
        else:
            n = generate(path, args.size_mb)
        size = path.stat().st_size
        print(f"file: {size / 2**20:.0f} MB, {n} lines, {size / n:.0f} bytes/line, valid chat rows; "
              f"{cpus} CPUs, load average {os.getloadavg()[0]:.1f}; best of {args.repeat} runs a side")
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for _ in range(args.repeat):
            for name, (python, code, *extra) in sides.items():
                runs[name].append(run(python, code, str(path), *extra))
    best = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}
    for name, rs in runs.items():
        for r in rs:
            assert r["passed"] and r["lines"] == n, (name, r)
        best[name]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)

    th, t1 = best["tunehouse"], best["together1"]
    settings = {
        "tunehouse": f"tunehouse {th['version']}: workers={args.workers} (one per CPU; {th['processes']} "
                     f"processes seen), msgspec "
                     f"{th['msgspec']} fast path + orjson {th['orjson']} precise path",
        "tunehouse_1proc": f"tunehouse {th['version']}: 1 process (workers=1), same code",
        "together1": f"together {t1['version']}: 1 process (no parallel option), stdlib json",
        "together3": f"together {best['together3']['version']}: 1 process (no parallel option), "
                     "stdlib json",
    }
    settings = {name: f"{line}, CPython {best[name]['python']}" for name, line in settings.items()}
    for name, r in best.items():
        print(f"{settings[name]}\n    checks: {WHAT[name.split('_')[0]]}\n"
              f"    {n / r['seconds']:>10,.0f} lines/s  check {r['seconds']:.2f} s  wall "
              f"{r['wall_s']:.2f} s  cpu {r['check_cpu_s']:.2f} s (with start-up {r['cpu_s']:.2f} s)  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")

    def ratio(peer: str, ours: str = "tunehouse", key: str = "seconds") -> float:
        return round(best[peer][key] / best[ours][key], 2)

    print(f"speedup vs together 1.6.0 (same checks): {ratio('together1'):.2f}x on {args.workers} "
          f"processes, {ratio('together1', 'tunehouse_1proc'):.2f}x on 1 process "
          f"(wall-clock {ratio('together1', key='wall_s'):.2f}x)")
    print(f"speedup vs together 3.1.1 (fewer checks): {ratio('together3'):.2f}x on {args.workers} "
          f"processes, {ratio('together3', 'tunehouse_1proc'):.2f}x on 1 process "
          f"(wall-clock {ratio('together3', key='wall_s'):.2f}x)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {cpus} CPUs (figures are noisy above "
          f"{cpus}: CPU time is the steadier measure)")
    summary = {"size_mb": round(size / 2**20), "lines": n, "workers": args.workers, "cpus": cpus,
               "repeat": args.repeat}
    for name, r in best.items():
        summary |= {f"{name}_lines_per_s": round(n / r["seconds"]), f"{name}_check_s": round(r["seconds"], 3),
                    f"{name}_wall_s": round(r["wall_s"], 3), f"{name}_cpu_s": round(r["check_cpu_s"], 3),
                    f"{name}_peak_rss_mb": round(r["peak_rss_mb"], 1)}
    summary |= {
        "speedup": ratio("together1"), "speedup_1proc": ratio("together1", "tunehouse_1proc"),
        "speedup_wall": ratio("together1", key="wall_s"),
        "speedup_vs_together3": ratio("together3"),
        "speedup_vs_together3_1proc": ratio("together3", "tunehouse_1proc"),
        "speedup_cpu": ratio("together1", key="check_cpu_s"),
        "speedup_cpu_vs_together3": ratio("together3", key="check_cpu_s"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
