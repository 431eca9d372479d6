"""Downstream tasks: one head + dataset builder per task (the registry: ``vlp.tasks.registry``).

Retrieval lives in ``vlp.tasks.retrieval`` (its own interface); the other tasks share ``TaskHead``.
"""
