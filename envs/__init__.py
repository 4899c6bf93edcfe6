"""Trainer-facing environments: the protocols (``envs.types``) and concrete environments.

``envs.harbor`` turns Harbor task directories into environments: loading and splitting tasks
(``tasks``), the bash tool (``bash_tool``), Harbor-identical grading (``grader``), the
privileged teacher view (``teacher_view``), dataset builders (``builders``) and the bundled
suite (``suite/``). Load-time errors live in ``envs.errors``.
"""
