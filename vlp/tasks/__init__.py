"""Downstream tasks: one head + dataset builder per task, keyed by the task names used in configs.

Retrieval lives in ``vlp.tasks.retrieval`` (its own interface); the tasks here share ``TaskHead``.
"""

from vlp.tasks.gqa import GQA
from vlp.tasks.nlvr2 import NLVR2
from vlp.tasks.refexp import RefExp
from vlp.tasks.snli_ve import SNLIVE
from vlp.tasks.vqa import VQA

TASKS = {"vqa": VQA, "nlvr2": NLVR2, "snli_ve": SNLIVE, "refcoco": RefExp, "gqa": GQA}
TASK_NAMES = ("retrieval", *TASKS)
# What finetune.tasks runs unless a config names its tasks: GQA is opt-in (configs/gqa.yaml), since its data
# exists only when download.datasets configures it.
DEFAULT_TASKS = ("retrieval", "vqa", "nlvr2", "snli_ve", "refcoco")
