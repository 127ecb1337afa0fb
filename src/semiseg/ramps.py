"""Ramp-up schedules for unsupervised loss weights (Laine & Aila 2017, as in SSL4MIS and UAPS)."""

from __future__ import annotations

import math


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - min(t, T)/T)^2)``: 0.0067 at ``t = 0``, 1 from ``t = T`` on; 1 when ``T <= 0``."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def linear_rampup(current: float, length: float) -> float:
    """``min(t, T) / T``; 1 when ``T <= 0``."""
    if length <= 0:
        return 1.0
    return min(max(current, 0.0), length) / length


def cosine_rampdown(current: float, length: float) -> float:
    """``0.5 (cos(pi t / T) + 1)`` for ``0 <= t <= T``."""
    current = min(max(current, 0.0), length)
    return 0.5 * (math.cos(math.pi * current / length) + 1.0)
