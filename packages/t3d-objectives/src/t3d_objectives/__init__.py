"""t3d_objectives: T3D's losses (TCL, TIR, global alignment) in a registry of objective terms,
crop corruptions and a gradient-carrying distributed gather. Depends on torch only; see
docs/objectives.md.
"""

from __future__ import annotations

from .alignment import AlignmentLoss, SigmoidAlignmentLoss
from .contrastive import TextInformedContrastiveLoss
from .corruptions import CropCorruption
from .distributed import gather_with_grad, rank, world_size
from .monitor import embedding_spread, is_collapsed
from .objective import PRESETS, ObjectiveConfig, T3DObjective, chance_losses, term_names
from .restoration import RestorationLoss
from .terms import TERMS, Term, register_term, unregister_term

__version__ = "0.1.0"
__all__ = [
    "AlignmentLoss",
    "CropCorruption",
    "ObjectiveConfig",
    "PRESETS",
    "RestorationLoss",
    "SigmoidAlignmentLoss",
    "T3DObjective",
    "TERMS",
    "Term",
    "TextInformedContrastiveLoss",
    "chance_losses",
    "embedding_spread",
    "gather_with_grad",
    "is_collapsed",
    "rank",
    "register_term",
    "term_names",
    "unregister_term",
    "world_size",
]
