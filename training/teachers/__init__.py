"""Teachers: frozen models that score the student's tokens (``training.types.Teacher``)."""

from training.teachers.local import LocalTeacher
from training.teachers.remote import RemoteTeacher
from training.teachers.vllm_server import VLLMServerTeacher

__all__ = ["LocalTeacher", "RemoteTeacher", "VLLMServerTeacher"]
