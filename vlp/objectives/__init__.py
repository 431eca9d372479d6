"""Pretraining objectives, keyed by the task names used in configs: UNITER's, ITC, and LAViTeR's (vta: DAMSM
alone; laviter: the whole method)."""

from vlp.objectives.damsm import VTA
from vlp.objectives.itc import ITC
from vlp.objectives.itm import ITM
from vlp.objectives.laviter import LAViTeR
from vlp.objectives.mlm import MLM
from vlp.objectives.mrc import MRC, MRCKL
from vlp.objectives.mrfr import MRFR

REGISTRY = {"mlm": MLM, "mrfr": MRFR, "mrc": MRC, "mrc_kl": MRCKL, "itm": ITM, "itc": ITC, "vta": VTA,
            "laviter": LAViTeR}
