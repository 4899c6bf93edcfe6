"""Serve a frozen teacher over HTTP, for training elsewhere with ``teacher_protocol=apprentice``.

    python -m recipes.serve_teacher [model=NAME] [port=8001] [host=127.0.0.1] [dtype=auto]
                                    [device=cpu|cuda] [checkpoint=FOLDER]           (--help)

Loads the model once (a Hugging Face id, a local folder, or the embedded smollm2-135m-instruct;
``checkpoint`` adds a LoRA adapter or one of our checkpoints), scores with ``LocalTeacher`` and
answers ``POST /v1/score`` in our binary wire format (``training.teachers.wire``). Prints the
URL once it accepts connections; Ctrl-C or SIGTERM finish the calls in flight and exit 0. A
trainer uses it with ``teacher_url=URL teacher_protocol=apprentice teacher_model=NAME`` (the
tokenizer is loaded on the trainer's side from ``teacher_model``).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from pydantic import Field

from recipes.cli import RecipeConfig
from recipes.common import Dtype, parse_or_explain, quiet_libraries
from training import models
from training.errors import TrainingError
from training.teachers import LocalTeacher
from training.teachers.server import serve
from training.weights import load_weights


class Config(RecipeConfig):
    """Serve a frozen teacher over HTTP (our wire format; RemoteTeacher is the client)."""

    model: str = models.EMBEDDED_MODEL
    """The teacher: a Hugging Face id, a local folder, or smollm2-135m-instruct (embedded)."""
    checkpoint: str | None = None
    """Weights loaded onto model: a LoRA adapter folder, a checkpoint or run folder of ours
    (training.weights); None: model as it is."""
    host: str = "127.0.0.1"
    """The address to listen on (0.0.0.0: every interface; the server has no authentication,
    so expose it only on a network you trust)."""
    port: int = Field(8001, ge=0, le=65535)
    """The port (0: any free one; the printed URL says which)."""
    dtype: Dtype = "auto"
    """auto (bf16 where the hardware computes it natively, else fp32) | bf16 | fp32 | fp16."""
    device: str | None = None
    """cpu, cuda, cuda:1, ...; None: cuda when available, else cpu."""
    chunk_size: int = Field(1024, ge=1)
    """Positions per LM-head chunk (peak logits memory: chunk_size x vocabulary x 4 bytes)."""
    max_batch_tokens: int = Field(8192, ge=1)
    """Padded tokens per forward pass; waiting requests are batched up to this."""


def load(config: Config) -> LocalTeacher:
    if config.checkpoint:
        loaded = load_weights(
            config.checkpoint, base_model=config.model, dtype=config.dtype, device=config.device
        )
        model = loaded.model
    else:
        model, _ = models.load_frozen(config.model, dtype=config.dtype, device=config.device)
    model.eval().requires_grad_(False)
    return LocalTeacher(
        model,
        name=config.model,
        chunk_size=config.chunk_size,
        max_batch_tokens=config.max_batch_tokens,
    )


def main(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()
    config = parse_or_explain(Config, argv)
    if config is None:
        return 2
    signal.signal(signal.SIGTERM, _stop)  # while loading; uvicorn takes it over while serving
    try:
        teacher = load(config)
        name = config.model + (f" + {config.checkpoint}" if config.checkpoint else "")

        def ready(url: str) -> None:
            print(f"Teacher {name} is serving at {url} (POST /v1/score); Ctrl-C stops it.")
            print(
                f"Train with: teacher_url={url} teacher_protocol=apprentice "
                f"teacher_model={config.model}",
                flush=True,
            )

        serve(teacher, host=config.host, port=config.port, on_ready=ready)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
    print("Teacher server stopped.", flush=True)
    return 0


def _stop(signum: int, frame: object) -> None:
    """SIGTERM: a clean exit (uvicorn re-raises it after its graceful shutdown)."""
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
