"""Training: the one generic loop (:class:`Trainer`) shared by every torch model."""

from acfrec.train.trainer import Trainer, default_validator

__all__ = ["Trainer", "default_validator"]
