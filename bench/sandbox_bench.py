"""CPU benchmark of the code reward's jail (rewards/sandbox.py): programs/s through the `code` handler, in one run.

    make bench-sandbox                                  # bench/results/sandbox_bench.{json,md}
    python -m bench.sandbox_bench --out DIR [--quick]   # --quick: 8 programs, one repeat: checks the script

Workload: `--programs` completions of a small honest solution (a fenced block defining two functions) with three
assert tests each, scored by `build_reward({"code": {"workers": W}})` for W in `--workers` (default 1, 2, 4),
jailed (`isolation: bwrap`) and, as the yardstick of what the jail costs, unjailed (`isolation: none`). Each
(isolation, workers) cell is timed `--repeats` times after one warm-up batch; the table gives the median
programs/s and its range. Every score is checked to be 1.0, so a broken jail cannot report a fast zero.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rewards import build_reward

SOLUTION = """```python
def gcd(a, b):
    while b:
        a, b = b, a % b
    return a

def primes(n):
    sieve = [True] * (n + 1)
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = [False] * len(sieve[i * i::i])
    return [i for i in range(2, n + 1) if sieve[i]]
```"""
TESTS = ["assert gcd(12, 18) == 6", "assert primes(30) == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]",
         "assert len(primes(10000)) == 1229"]


def measure(isolation: str, workers: int, programs: int, repeats: int) -> dict:
    with contextlib.redirect_stderr(io.StringIO()):  # isolation: none prints its warning once per build
        reward = build_reward({"code": {"workers": workers, "isolation": isolation}})
    batch = ([""] * programs, [SOLUTION] * programs)
    reward(batch[0][:workers], batch[1][:workers], tests=[TESTS] * workers)  # warm-up: page cache, the jail probe
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = reward(*batch, tests=[TESTS] * programs)
        seconds = time.perf_counter() - start
        if out.scores != [1.0] * programs:
            raise RuntimeError(f"{isolation}, {workers} workers: honest programs did not all score 1: {out.scores}")
        rates.append(programs / seconds)
    return {"isolation": isolation, "workers": workers, "programs": programs, "programs_per_s": rates,
            "median_programs_per_s": statistics.median(rates)}


def machine() -> dict:
    bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "kernel": platform.release(),
            "python": platform.python_version(), "bwrap": bwrap, "euid": os.geteuid(),
            "loadavg_at_start": [round(x, 2) for x in load]}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Code-reward jail throughput ({res['date']})", "",
             f"{m['cpus']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, {m['bwrap']}, "
             f"trainer euid {m['euid']}; load average (1/5/15 min) at start {m['loadavg_at_start']}, at the end "
             f"{m['loadavg_at_end']}. "
             f"{res['programs']} programs per batch (one solution, 3 asserts), median of {res['repeats']} batches "
             "after a warm-up (range in brackets). Every score checked to be 1.0.", "",
             "| isolation | workers | programs/s | ms/program |", "|---|---|---|---|"]
    for cell in res["cells"]:
        rates = cell["programs_per_s"]
        lines.append(f"| {cell['isolation']} | {cell['workers']} | {cell['median_programs_per_s']:.1f} "
                     f"[{min(rates):.1f}-{max(rates):.1f}] | {1000 / cell['median_programs_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results", help="directory for sandbox_bench.json / sandbox_bench.md")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--programs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="8 programs, one repeat: check the script end to end")
    args = ap.parse_args(argv)
    if args.quick:
        args.programs, args.repeats = 8, 1
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "programs": args.programs,
           "repeats": args.repeats, "command": " ".join([Path(sys.executable).name, "-m", "bench.sandbox_bench",
                                                         *(argv if argv is not None else sys.argv[1:])]),
           "cells": []}
    for isolation in ("bwrap", "none"):
        for workers in args.workers:
            cell = measure(isolation, workers, args.programs, args.repeats)
            res["cells"].append(cell)
            print(f"{isolation:5s} workers={workers}: {cell['median_programs_per_s']:.1f} programs/s", flush=True)
    res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]  # others' work on a shared box
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sandbox_bench.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "sandbox_bench.md").write_text(markdown(res))


if __name__ == "__main__":
    main()
