"""``make demo``: multi-turn Harbor distillation, offline, in about ten minutes on 2 CPU cores.

    python -m recipes.demo [key=value ...]          (any key of harbor_multi_turn; --help)

The bundled task suite (train split for training, test split held out), the embedded
SmolLM2-135M-Instruct as the student and, prompted with each task's reference solution, as the
teacher; local bubblewrap sandboxes. The recipe was chosen by measurement (docs/training.md):
SmolLM2-135M never opens a tool call on its own, so a short SFT warm start on the reference
solutions (replayed as real bash calls) teaches it the tool-call format before on-policy
distillation from the privileged teacher takes over.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from recipes.common import cli
from recipes.distillation.harbor_multi_turn import Config, main

HINT_TEMPLATE = "{instruction}\n\nHint: this command solves it: {commands}"
"""The privileged teacher's first user message in the demo."""


class DemoConfig(Config):
    """The harbor_multi_turn recipe with the demo's measured settings as defaults."""

    recipe_name: ClassVar[str] = "demo"

    sft_warmup_steps: int = Field(5, ge=0)
    """SFT steps on the train tasks' reference solutions before distillation (40 demonstrations
    ~ one pass over the 39 train tasks)."""
    max_steps: int | None = Field(10, ge=1)
    """5 SFT steps, then 5 on-policy distillation steps."""
    groups_per_batch: int = Field(8, ge=1)
    """Tasks per batch."""
    group_size: int = Field(1, ge=1)
    """Episodes per task (demonstrations of one task are identical: one is enough)."""
    max_turns: int = Field(2, ge=1)
    """The tasks take one command; the second turn is for the closing message."""
    max_tokens: int = Field(96, ge=1)
    """Sampling budget of one turn (a command fits in well under 96 tokens)."""
    max_trajectory_tokens: int | None = Field(1024, ge=2)
    """Budget of one episode's sequence."""
    learning_rate: float = Field(2e-3, gt=0.0)
    """High for LoRA, so that a handful of SFT steps teach the tool-call format."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decays over the run, so distillation (the later steps) takes smaller steps than SFT:
    at a constant 2e-3 the sampled KL estimate's noise made later steps drift (measured)."""
    teacher_from_warmup: bool = True
    """The teacher is the warm-started student with the reference solution in its prompt: the
    base SmolLM2 cannot act in the tool-call format, and distilling from it undid the warm
    start (measured)."""
    teacher_template: str | None = HINT_TEMPLATE
    """The task's instruction followed by a one-line hint: the warm-started model follows it,
    while the default template's longer brief made it answer "Done." without a call."""
    eval_every: int = Field(5, ge=0)
    """Evaluate before training, after the SFT warm start and at the end."""
    save_every: int = Field(5, ge=0)
    """Checkpoint after the warm start and at the end."""
    microbatch_tokens: int = Field(2048, ge=1)
    """Padded tokens per forward/backward (the whole demo peaks at about 7 GB resident)."""


if __name__ == "__main__":
    raise SystemExit(cli(main, DemoConfig))
