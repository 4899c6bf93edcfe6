"""Samplers: the student's completions for each turn (``training.types.Sampler``)."""

from training.samplers.hf import HFSampler

__all__ = ["HFSampler"]
