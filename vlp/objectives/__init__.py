"""Pretraining objectives, keyed by the task names used in configs: UNITER's, ITC, CODIS's alignment
objectives (itc_intra, codebook), LAViTeR's (vta: DAMSM alone; laviter: the whole method) and object-word
alignment (owa)."""

from vlp.objectives.codebook import Codebook
from vlp.objectives.damsm import VTA
from vlp.objectives.itc import ITC, ITCIntra
from vlp.objectives.itm import ITM
from vlp.objectives.laviter import LAViTeR
from vlp.objectives.mlm import MLM
from vlp.objectives.mrc import MRC, MRCKL
from vlp.objectives.mrfr import MRFR
from vlp.objectives.owa import ObjectWordAlignment

REGISTRY = {"mlm": MLM, "mrfr": MRFR, "mrc": MRC, "mrc_kl": MRCKL, "itm": ITM, "itc": ITC,
            "itc_intra": ITCIntra, "codebook": Codebook, "vta": VTA, "laviter": LAViTeR,
            "owa": ObjectWordAlignment}
