"""The downstream task registry, keyed by the task names used in configs.

A module of its own, not the package's ``__init__``: a stage that needs one task's code (pretraining
validation needs retrieval's scorer) then does not load every task, and its cache key does not hold them.
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
