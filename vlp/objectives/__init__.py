"""Pretraining objectives, keyed by the task names used in configs (``owa``: object-word alignment)."""

from vlp.objectives.itc import ITC
from vlp.objectives.itm import ITM
from vlp.objectives.mlm import MLM
from vlp.objectives.mrc import MRC, MRCKL
from vlp.objectives.mrfr import MRFR
from vlp.objectives.owa import ObjectWordAlignment

REGISTRY = {"mlm": MLM, "mrfr": MRFR, "mrc": MRC, "mrc_kl": MRCKL, "itm": ITM, "itc": ITC,
            "owa": ObjectWordAlignment}
