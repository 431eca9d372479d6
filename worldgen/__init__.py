"""The miniature internet: rendered scenes published in the real formats of every corpus and task set,
the loopback mirror that serves them with injected faults, and the truth of what was planted.

It imports nothing of the pipeline or the stages (the ``world`` stage wraps it), and it is the one
factory of worlds for tests: ``presets.micro()`` for unit tests, ``configs/tiny.yaml`` for smoke runs.
"""
