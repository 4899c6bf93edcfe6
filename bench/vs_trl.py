"""On-policy distillation steps: TRL's ``DistillationTrainer`` against our
``recipes.distillation.on_policy``, same work on the same machine.

Both sides train the same student (LoRA r=16, alpha 32, every linear layer but the LM head) to
match the same frozen teacher on the same 32 prompts (``bench/data/prompts.jsonl``, rendered to
identical token ids by both), fully on-policy (TRL has no off-policy mix; ours ``lmbda=1``):
each step samples ``batch`` completions of at most ``max_new_tokens`` tokens at temperature 1,
scores them with the teacher and takes one AdamW step (lr 1e-4, constant, grad clip 1.0) on the
reverse KL. TRL computes the exact full-vocabulary reverse KL (``beta=1``); ours by default the
sampled-token estimate (``loss=sampled_reverse_kl``, the recipe's default); ``loss=jsd`` runs
ours on TRL's exact objective (``beta=1``). TRL keeps its defaults otherwise (gradient
checkpointing on; ``trl_gradient_checkpointing=false`` turns it off). Ours trades memory its own
way: no recomputation (``ours_gradient_checkpointing=true`` turns it on) but micro-batches of
``ours_microbatch_tokens`` padded tokens (256: two of the four ~105-token sequences at a time,
gradients accumulated; the recipe's default 4096 takes the batch at once).

Each side runs in its own fresh process (so peak RSS is its own: models, libraries, training),
and the runs alternate TRL, ours, TRL, ours ... (``rounds``), so load from other jobs hits both
alike. Per run, the first step is a warm-up and not counted; a step is the wall time between
the ends of consecutive steps (sampling, scoring, training, logging). Student tokens are the
sampled completion tokens (EOS included; the prompts ask for long answers, so most completions
use the whole budget). Usage::

    python -m bench.vs_trl [quick] [steps=N] [rounds=R] [loss=jsd]
        [student=PATH teacher=PATH] [trl_gradient_checkpointing=false]
        [ours_gradient_checkpointing=true] [ours_microbatch_tokens=N]
        [device=cpu|cuda] [ours_sampler=hf|vllm]

``device`` defaults to ``cuda`` where a GPU is visible, else ``cpu``; ``device=cpu`` on a GPU
machine hides the GPU from both sides. On a GPU, peak GPU memory (``torch.cuda``'s allocated
peak) is reported beside peak RSS and is what the memory target compares. ``ours_sampler=vllm``
samples with vLLM's engine in-process (the recipe's ``sampler=vllm``; needs vLLM); TRL keeps
its own generation.

Needs TRL (``pip install -e '.[bench]'``). Target: ours >= 1.5x TRL's student tokens per second
at no more peak memory. The last line printed is one JSON object.
"""

from __future__ import annotations

import importlib.util
import itertools
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    context,
    in_fresh_process,
    log,
    parse_bool,
    parse_device,
    peak_rss_mb,
    run_main,
)

PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"
TARGET_SPEEDUP = 1.5
SIDES = ("trl", "ours")
LOSSES = ("sampled_reverse_kl", "jsd")
VLLM_MEMORY = (
    "ours_sampler=vllm: vLLM's engine reserves its share of the card (gpu_memory_utilization) "
    "in its own process, which torch.cuda's peak in the trainer process does not see"
)


@dataclass(frozen=True)
class Setting:
    """What both sides run."""

    student: str
    teacher: str
    steps: int
    batch: int = 4
    max_new_tokens: int = 64
    lora_rank: int = 16
    learning_rate: float = 1e-4
    dtype: str = "bf16"
    loss: str = "sampled_reverse_kl"
    """Ours: sampled_reverse_kl (sampled-token estimate) or jsd (exact, with beta 1)."""
    trl_gradient_checkpointing: bool = True
    ours_gradient_checkpointing: bool = False
    """Ours: the recipe's default is off (speed); on, it matches TRL's default memory trade."""
    ours_microbatch_tokens: int = 256
    """Ours: padded tokens per forward/backward (gradients accumulate over the batch): about
    two sequences at a time, which holds half the activations for ~2% of the training time."""
    seed: int = 0
    device: str = "cpu"
    ours_sampler: str = "hf"


def _prompts() -> list[list[dict[str, str]]]:
    import json

    lines = PROMPTS.read_text().splitlines()
    return [json.loads(line)["messages"] for line in lines if line.strip()]


def _summary(side: str, ends: list[float], tokens: list[int], phases: dict[str, list[float]]):
    """Per-run numbers from the end time of every step; step 1 is the warm-up."""
    durations = [b - a for a, b in itertools.pairwise(ends)]
    counted = tokens[1:]
    return {
        "side": side,
        "step_s": [round(d, 3) for d in durations],
        "tokens": counted,
        "phases_s": {k: [round(x, 3) for x in v[1:]] for k, v in phases.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **_peak_gpu(),
    }


def _peak_gpu() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 1e6, 1)}


def run_trl(setting: Setting) -> dict[str, Any]:
    """TRL's DistillationTrainer for ``setting.steps`` steps (in a fresh process)."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import torch

    from training import models

    torch.manual_seed(setting.seed)
    student = models.load_model(setting.student, dtype=setting.dtype, device=setting.device)
    teacher, _ = models.load_frozen(setting.teacher, dtype=setting.dtype, device=setting.device)
    tokenizer = models.load_tokenizer(setting.student)
    tokenizer.padding_side = "left"
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in _prompts()])
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as workdir:
        return _train_trl(setting, student, teacher, tokenizer, dataset, workdir)


def _train_trl(
    setting: Setting, student: Any, teacher: Any, tokenizer: Any, dataset: Any, workdir: str
) -> dict[str, Any]:
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(
        output_dir=workdir,
        max_steps=setting.steps,
        per_device_train_batch_size=setting.batch,
        gradient_accumulation_steps=1,
        max_completion_length=setting.max_new_tokens,
        temperature=1.0,
        beta=1.0,  # reverse KL
        learning_rate=setting.learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        bf16=setting.dtype == "bf16",
        gradient_checkpointing=setting.trl_gradient_checkpointing,
        use_cpu=setting.device == "cpu",
        seed=setting.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft = LoraConfig(
        r=setting.lora_rank,
        lora_alpha=2 * setting.lora_rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft,
    )
    ends: list[float] = []
    tokens: list[int] = []
    generate_s: list[float] = []
    generate = trainer._generate_single_turn

    def timed_generate(*a: Any, **k: Any) -> list[list[int]]:
        start = time.perf_counter()
        completions = generate(*a, **k)
        generate_s.append(time.perf_counter() - start)
        tokens.append(sum(len(c) for c in completions))
        return completions

    trainer._generate_single_turn = timed_generate  # measures, changes nothing

    class StepEnds(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    trainer.add_callback(StepEnds())
    trainer.remove_callback(PrinterCallback)  # its log dicts would go to stdout
    trainer.train()
    steps = [b - a for a, b in itertools.pairwise(ends)]
    rest = [s - g for s, g in zip(steps, generate_s[1:], strict=True)]
    return _summary("trl", ends, tokens, {"generate": generate_s, "rest": [0.0, *rest]})


def run_ours(setting: Setting) -> dict[str, Any]:
    """``recipes.distillation.on_policy`` for ``setting.steps`` steps (in a fresh process). Its
    steps include writing their rollouts (TRL writes none): counted against us."""
    with tempfile.TemporaryDirectory(prefix="bench-vs-ours-") as log_path:
        return _train_ours(setting, log_path)


def _train_ours(setting: Setting, log_path: str) -> dict[str, Any]:
    import anyio

    from recipes.distillation.on_policy import Config, build_trainer

    config = Config(
        model_name=setting.student,
        teacher_model=setting.teacher,
        dataset=PROMPTS,
        validation_dataset=None,
        group_size=1,
        groups_per_batch=setting.batch,
        max_tokens=setting.max_new_tokens,
        lora_rank=setting.lora_rank,
        dtype=setting.dtype,
        loss=setting.loss,
        beta=1.0,
        lmbda=1.0,
        learning_rate=setting.learning_rate,
        max_grad_norm=1.0,
        gradient_checkpointing=setting.ours_gradient_checkpointing,
        microbatch_tokens=setting.ours_microbatch_tokens,
        sampler=setting.ours_sampler,
        max_steps=setting.steps,
        eval_every=0,
        eval_before=False,
        save_every=0,
        seed=setting.seed,
        progress=False,
        log_path=log_path,
    )
    trainer = build_trainer(config)
    ends: list[float] = []
    tokens: list[int] = []
    phases: dict[str, list[float]] = {"rollout": [], "score": [], "train": []}

    def on_step(done: int, metrics: Any) -> None:
        ends.append(time.perf_counter())
        tokens.append(int(metrics["tokens/student"]))
        for phase, values in phases.items():
            values.append(metrics.get(f"time/{phase}", 0.0))

    trainer.callbacks.append(on_step)
    anyio.run(trainer.train)
    return _summary("ours", ends, tokens, phases)


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [s for r in runs for s in r["step_s"]]
    tokens = [t for r in runs for t in r["tokens"]]
    phases: dict[str, float] = {}
    for name in runs[0]["phases_s"]:
        values = [v for r in runs for v in r["phases_s"][name]]
        phases[f"{name}_s_per_step"] = round(statistics.mean(values), 3) if values else 0.0
    return {
        "s_per_step_median": round(statistics.median(steps), 3),
        "s_per_step_mean": round(statistics.mean(steps), 3),
        "student_tokens_per_step": round(statistics.mean(tokens), 1),
        "student_tokens_per_s": round(sum(tokens) / sum(steps), 2),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        **(
            {"peak_gpu_mb": max(r["peak_gpu_mb"] for r in runs)} if "peak_gpu_mb" in runs[0] else {}
        ),
        **phases,
        "steps_counted": len(steps),
    }


def main(
    quick: bool = False,
    steps: int | str | None = None,
    rounds: int | str | None = None,
    student: str | None = None,
    teacher: str | None = None,
    loss: str = "sampled_reverse_kl",
    trl_gradient_checkpointing: bool | str = True,
    ours_gradient_checkpointing: bool | str = False,
    ours_microbatch_tokens: int | str = Setting.ours_microbatch_tokens,
    device: str | None = None,
    ours_sampler: str = "hf",
) -> dict[str, Any]:
    from training import models

    if importlib.util.find_spec("trl") is None:
        return context("vs_trl", quick) | {
            "skipped": "needs TRL: pip install -e '.[bench]' (the bench extra)"
        }
    device = parse_device(device)
    if ours_sampler not in ("hf", "vllm"):
        raise SystemExit(f"ours_sampler={ours_sampler!r}: expected hf or vllm")
    if loss not in LOSSES:  # before TRL's first run, not after it
        raise SystemExit(f"loss={loss!r}: expected one of {', '.join(LOSSES)} (TRL's reverse KL)")

    setting = Setting(
        student=student or models.EMBEDDED_MODEL,
        teacher=teacher or student or models.EMBEDDED_MODEL,
        steps=int(steps) if steps is not None else (3 if quick else 6),
        loss=loss,
        trl_gradient_checkpointing=parse_bool(
            "trl_gradient_checkpointing", trl_gradient_checkpointing
        ),
        ours_gradient_checkpointing=parse_bool(
            "ours_gradient_checkpointing", ours_gradient_checkpointing
        ),
        ours_microbatch_tokens=int(ours_microbatch_tokens),
        device=device,
        ours_sampler=ours_sampler,
    )
    if setting.steps < 2:
        raise SystemExit("steps must be >= 2 (the first step of each run is a warm-up)")
    if setting.student == models.EMBEDDED_MODEL:
        models.embedded_model_dir()  # convert once here, not inside a timed child
    rounds_n = int(rounds) if rounds is not None else (1 if quick else 3)
    result = context("vs_trl", quick) | {"setting": asdict(setting), "rounds": rounds_n}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    hide_gpu = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None  # ours follows it
    for round_index in range(rounds_n):
        for side in SIDES:  # interleaved: TRL, ours, TRL, ours, ...
            log("vs_trl", f"round {round_index + 1}/{rounds_n}: {side}, {setting.steps} steps")
            run = in_fresh_process(run_trl if side == "trl" else run_ours, setting, env=hide_gpu)
            log("vs_trl", f"  {side}: steps {run['step_s']} s, tokens {run['tokens']}")
            runs[side].append(run)
    trl, ours = _aggregate(runs["trl"]), _aggregate(runs["ours"])
    speedup = ours["student_tokens_per_s"] / trl["student_tokens_per_s"]
    memory_key = "peak_gpu_mb" if device == "cuda" else "peak_rss_mb"
    memory = ours[memory_key] / trl[memory_key]
    comparable = not (device == "cuda" and ours_sampler == "vllm")
    return result | {
        "trl_version": _trl_version(),
        # accelerate runs TRL's student under bf16 autocast: its float32 LoRA layers compute in
        # bf16, ours in float32 (peft's default)
        "trl_bf16_autocast": setting.dtype == "bf16",
        "trl": trl,
        "ours": ours,
        "tokens_per_s_ratio": round(speedup, 2),
        "s_per_step_speedup": round(trl["s_per_step_median"] / ours["s_per_step_median"], 2),
        f"{memory_key.removesuffix('_mb')}_ratio": round(memory, 2) if comparable else None,
        "target": f"ours >= {TARGET_SPEEDUP}x TRL tokens/s at no more {memory_key}",
        "target_met": (speedup >= TARGET_SPEEDUP and memory <= 1.0) if comparable else None,
        **({} if comparable else {"memory_not_comparable": VLLM_MEMORY}),
        "runs": runs,
    }


def _trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


if __name__ == "__main__":
    run_main(main)
