"""Data layer: reading and validation, id maps, leave-one-out splits, samplers, feature stores."""

from acfrec.data.cold import ColdSplit, cold_item_split
from acfrec.data.idmap import IdMap
from acfrec.data.interactions import Interactions
from acfrec.data.io import read_interactions
from acfrec.data.sampler import BPRBatch, BPRSampler, sample_negatives
from acfrec.data.split import Split
from acfrec.data.splitting import TIE_RULES, leave_one_out

__all__ = [
    "IdMap",
    "Interactions",
    "read_interactions",
    "Split",
    "leave_one_out",
    "ColdSplit",
    "cold_item_split",
    "TIE_RULES",
    "BPRSampler",
    "BPRBatch",
    "sample_negatives",
]
