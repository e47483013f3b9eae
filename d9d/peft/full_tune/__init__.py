"""Full tuning of chosen modules."""

from d9d.peft.full_tune.config import FullTuneConfig
from d9d.peft.full_tune.method import FullTune

__all__ = ["FullTune", "FullTuneConfig"]
