"""Downstream tasks: one head + dataset builder per task, keyed by the task names used in configs.

Retrieval lives in ``vlp.tasks.retrieval`` (its own interface); the tasks here share ``TaskHead``.
"""

from vlp.tasks.nlvr2 import NLVR2
from vlp.tasks.refexp import RefExp
from vlp.tasks.snli_ve import SNLIVE
from vlp.tasks.vqa import VQA

TASKS = {"vqa": VQA, "nlvr2": NLVR2, "snli_ve": SNLIVE, "refcoco": RefExp}
TASK_NAMES = ("retrieval", *TASKS)
