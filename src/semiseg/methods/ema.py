"""An exponential-moving-average teacher (Mean Teacher, UA-MT, U2PL, ...).

The teacher starts as a copy of the student and never receives gradients; after each optimisation step
``update`` sets ``θ_teacher ← α θ_teacher + (1 − α) θ_student``.

BatchNorm buffers (running mean / variance) follow ``buffers``:

* ``"ema"`` (default): averaged with the same decay as the parameters (``num_batches_tracked`` copied), so
  the teacher's normalisation statistics are a smoothed version of the student's; the teacher can then be
  run in eval mode.
* ``"own"``: left alone, so they come from the teacher's own forward passes in train mode — what the
  Mean Teacher and SSL4MIS code do (they average parameters only).
* ``"copy"``: copied from the student at every update.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from semiseg.errors import ConfigError, check_choice

BUFFER_POLICIES = ("ema", "own", "copy")


class EMATeacher(nn.Module):
    """A frozen moving-average copy of ``student``; call it like the student (no gradients).

    Args:
        student: the network to follow.
        decay: α, the weight of the old teacher at each update.
        buffers: ``ema``, ``own`` or ``copy`` (see the module docstring).
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, buffers: str = "ema") -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"method.ema_decay={decay} must lie in [0, 1]")
        check_choice("method.ema_buffers", buffers, BUFFER_POLICIES)
        self.decay = decay
        self.buffers_policy = buffers
        self.module = copy.deepcopy(student)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float | None = None) -> None:
        """Move the teacher towards ``student`` by ``1 - decay`` (default: the configured decay)."""
        alpha = self.decay if decay is None else decay
        for teacher_param, student_param in zip(self.module.parameters(), student.parameters(), strict=True):
            teacher_param.lerp_(student_param.detach(), 1.0 - alpha)
        if self.buffers_policy == "own":
            return
        for teacher_buffer, student_buffer in zip(self.module.buffers(), student.buffers(), strict=True):
            if self.buffers_policy == "copy" or not teacher_buffer.is_floating_point():
                teacher_buffer.copy_(student_buffer)
            else:
                teacher_buffer.lerp_(student_buffer, 1.0 - alpha)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)


def ramped_ema_decay(step: int, max_decay: float) -> float:
    """``min(1 - 1 / (step + 1), max_decay)``: a fast start, then ``max_decay`` (Mean Teacher, U2PL)."""
    return min(1.0 - 1.0 / (step + 1.0), max_decay)
