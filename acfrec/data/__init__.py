"""Data layer: reading and validation, id maps, leave-one-out splits, samplers, feature stores."""

from acfrec.data.idmap import IdMap
from acfrec.data.sampler import BPRBatch, BPRSampler, sample_negatives
from acfrec.data.split import Split

__all__ = ["IdMap", "Split", "BPRSampler", "BPRBatch", "sample_negatives"]
