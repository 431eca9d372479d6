"""UNITER pretraining objectives and CODIS's alignment objectives, keyed by the task names used in configs."""

from vlp.objectives.codebook import Codebook
from vlp.objectives.itc import ITC, ITCIntra
from vlp.objectives.itm import ITM
from vlp.objectives.mlm import MLM
from vlp.objectives.mrc import MRC, MRCKL
from vlp.objectives.mrfr import MRFR

REGISTRY = {"mlm": MLM, "mrfr": MRFR, "mrc": MRC, "mrc_kl": MRCKL, "itm": ITM, "itc": ITC,
            "itc_intra": ITCIntra, "codebook": Codebook}
