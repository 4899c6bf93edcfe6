"""Run every benchmark: ``python -m bench [quick] [only=NAME,NAME]``.

Each benchmark runs as ``python -m bench.<name> [quick]`` in its own process (memory readings
stay its own; a crash stays its own). Its progress goes to stderr; its result, one JSON object,
is printed as one line on stdout with ``ok`` and the wall time added. A benchmark that fails
gets a line with ``ok: false`` and the end of its stderr, and the others still run; the exit
status is 1 when any failed. Parts that need something this machine lacks (the vLLM CPU venv,
docker, TRL) are skipped inside the benchmark, with the reason in its result.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import threading
import time
from typing import Any

from bench.common import parse_args

BENCHMARKS = ("tokenization", "sandboxes", "loss_memory", "sampler", "teacher", "vs_trl")
"""Cheapest first."""


def run_one(name: str, quick: bool) -> dict[str, Any]:
    """One benchmark in a child process; its stderr is relayed live and its tail kept."""
    argv = [sys.executable, "-m", f"bench.{name}", *(["quick"] if quick else [])]
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tail: collections.deque[str] = collections.deque(maxlen=15)

    def relay() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip())

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    assert child.stdout is not None
    stdout = child.stdout.read()  # not communicate(): it would read stderr too
    child.wait()
    relay_thread.join()
    seconds = round(time.perf_counter() - start, 1)
    lines = stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if child.returncode == 0 and isinstance(result, dict):
        return {**result, "ok": True, "wall_s": seconds}
    why = f"exit status {child.returncode}" if child.returncode else "no JSON result line"
    return {"bench": name, "ok": False, "error": why, "stderr_tail": list(tail), "wall_s": seconds}


def main(argv: list[str]) -> int:
    quick, options = parse_args(argv)
    unknown = set(options) - {"only"}
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)}: expected quick and only=NAME,...")
    names = options["only"].split(",") if "only" in options else list(BENCHMARKS)
    wrong = [n for n in names if n not in BENCHMARKS]
    if wrong:
        raise SystemExit(f"unknown benchmark(s) {wrong}: expected some of {list(BENCHMARKS)}")
    failed = []
    for name in names:
        print(f"[bench] {name}{' (quick)' if quick else ''}", file=sys.stderr, flush=True)
        result = run_one(name, quick)
        print(json.dumps(result), flush=True)
        if not result["ok"]:
            failed.append(name)
    status = f"failed: {', '.join(failed)}" if failed else "all ran"
    print(f"[bench] {len(names)} benchmarks, {status}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
