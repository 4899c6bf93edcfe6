"""Sandbox overheads, all backends in one run.

- exec overhead: p50/p99 wall time of ``exec("true")`` (the full persistent-shell wrapper
  included) on a warm sandbox, for ``local`` (bubblewrap), ``docker`` (our default docker mode:
  the spawner in the container), ``docker_api`` (our docker backend through the SDK's
  ``exec_create``/``exec_start``) and the baseline ``docker_cli``: a ``docker exec <container>
  true`` subprocess, which is what Harbor's docker environment pays per command (it goes
  through the compose CLI, which is not installable here).
- start: p50 seconds of ``create`` with a cached image (local: nothing to build).
- 64 concurrent: wall time and failures of 64 sandboxes created, each running one command and
  closed, all at once through ``make_factory`` (bounded creation).

Targets: local <= 5 ms, docker <= 30 ms, docker_cli / docker >= 5x, start <= 0.5 s, 0 failures.
Usage::

    python -m bench.sandboxes [quick]

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from bench.common import context, log, run_main
from sandboxes.docker import DockerFactory, docker_available
from sandboxes.factory import make_factory
from sandboxes.local import LocalFactory, bwrap_available
from sandboxes.types import SandboxSpec

TARGETS = {
    "local_exec_p50_ms": 5.0,
    "docker_exec_p50_ms": 30.0,
    "docker_cli_over_docker": 5.0,
    "start_p50_s": 0.5,
    "concurrent_failures": 0,
}


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "n": len(ordered),
    }


async def timed(call: Callable[[], Awaitable[Any]], n: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


async def exec_overhead(factory: Any, n: int) -> dict[str, float]:
    async with await factory.create(SandboxSpec(name="bench-exec")) as sandbox:

        async def true() -> None:
            result = await sandbox.exec("true")
            assert result.ok, result

        return percentiles(await timed(true, n))


async def cli_baseline(factory: DockerFactory, n: int) -> dict[str, float]:
    async with await factory.create(SandboxSpec(name="bench-cli")) as sandbox:
        argv = ["docker", "exec", sandbox.container_id, "true"]

        async def true() -> None:
            await anyio.run_process(argv)

        return percentiles(await timed(true, n, warmup=3))


async def start_latency(factory: Any, n: int) -> dict[str, float]:
    samples = []
    await (await factory.create(SandboxSpec(name="bench-warm"))).close()
    for i in range(n):
        start = time.perf_counter()
        sandbox = await factory.create(SandboxSpec(name=f"bench-start-{i}"))
        samples.append(time.perf_counter() - start)
        await sandbox.close()
    return {
        "p50_s": round(statistics.median(samples), 3),
        "max_s": round(max(samples), 3),
        "n": n,
    }


async def concurrent(backend: str, n: int) -> dict[str, Any]:
    factory = make_factory(backend)
    failures: list[str] = []

    async def one(i: int) -> None:
        try:
            async with await factory.create(SandboxSpec(name=f"bench-many-{i}")) as sandbox:
                result = await sandbox.exec(f"echo {i}", timeout=120)
                if result.stdout != f"{i}\n":
                    failures.append(f"{i}: {result}")
        except Exception as exc:
            failures.append(f"{i}: {type(exc).__name__}: {exc}")

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for i in range(n):
            group.start_soon(one, i)
    for failure in failures[:5]:
        log("sandboxes", f"  failure: {failure}")
    return {"n": n, "wall_s": round(time.perf_counter() - start, 2), "failures": len(failures)}


def main(quick: bool = False) -> dict[str, Any]:
    return anyio.run(run, quick)


async def run(quick: bool) -> dict[str, Any]:
    n_fast, n_slow, n_start, n_many = (50, 10, 3, 64) if quick else (1000, 100, 20, 64)
    results = context("sandboxes", quick)
    if (problem := bwrap_available()) is None:
        local = LocalFactory()
        log("sandboxes", f"local exec x{n_fast}")
        results["local_exec"] = await exec_overhead(local, n_fast)
        log("sandboxes", f"local start x{n_start}")
        results["local_start"] = await start_latency(local, n_start)
        log("sandboxes", f"local {n_many} concurrent")
        results["local_concurrent"] = await concurrent("local", n_many)
    else:
        results["local_skipped"] = problem
    if (problem := docker_available()) is None:
        docker = DockerFactory()
        log("sandboxes", f"docker exec x{n_fast}")
        results["docker_exec"] = await exec_overhead(docker, n_fast)
        log("sandboxes", f"docker exec API x{n_slow}")
        results["docker_api_exec"] = await exec_overhead(DockerFactory(exec_mode="api"), n_slow)
        log("sandboxes", f"docker CLI baseline x{n_slow}")
        results["docker_cli_exec"] = await cli_baseline(docker, n_slow)
        log("sandboxes", f"docker start x{n_start}")
        results["docker_start"] = await start_latency(docker, n_start)
        log("sandboxes", f"docker {n_many} concurrent")
        results["docker_concurrent"] = await concurrent("docker", n_many)
    else:
        results["docker_skipped"] = problem
    results["targets"] = TARGETS
    results["met"] = check(results)
    # nothing measured (no bubblewrap, no docker) is not a target met
    results["target_met"] = all(results["met"].values()) if results["met"] else None
    return results


def check(results: dict[str, Any]) -> dict[str, bool]:
    met: dict[str, bool] = {}
    if "local_exec" in results:
        met["local_exec"] = results["local_exec"]["p50_ms"] <= TARGETS["local_exec_p50_ms"]
        met["local_start"] = results["local_start"]["p50_s"] <= TARGETS["start_p50_s"]
        met["local_concurrent"] = results["local_concurrent"]["failures"] == 0
    if "docker_exec" in results:
        docker, cli = results["docker_exec"]["p50_ms"], results["docker_cli_exec"]["p50_ms"]
        results["docker_cli_over_docker"] = round(cli / docker, 1)
        met["docker_exec"] = docker <= TARGETS["docker_exec_p50_ms"]
        met["docker_vs_cli"] = cli / docker >= TARGETS["docker_cli_over_docker"]
        met["docker_start"] = results["docker_start"]["p50_s"] <= TARGETS["start_p50_s"]
        met["docker_concurrent"] = results["docker_concurrent"]["failures"] == 0
    return met


if __name__ == "__main__":
    run_main(main)
