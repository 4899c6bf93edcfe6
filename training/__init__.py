"""Training: models, samplers, teachers, losses and the trainer loop.

Start with ``training/types.py`` (the protocols). Inference lives in ``models`` (loading, the
embedded SmolLM2, LoRA), ``samplers`` (``HFSampler``, ``VLLMServerSampler``,
``VLLMEngineSampler``) and ``teachers`` (``LocalTeacher``, ``VLLMServerTeacher``); ``vocab``
checks that a teacher can score the student's ids. Submodules are imported on use, so
``import training`` stays cheap.
"""
