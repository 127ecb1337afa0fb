"""The supervised baseline: the network trained on the labeled images alone (LDT in the Inconsistency
Masks paper; ``labeled_ratio=1`` gives the fully supervised upper bound)."""

from __future__ import annotations

from typing import ClassVar

from semiseg.methods.base import SemiSupervisedModule


class Supervised(SemiSupervisedModule):
    """Supervised training on labeled images with ``0.5 (CE + Dice)``; unlabeled images are not loaded."""

    uses_unlabeled: ClassVar[bool] = False
