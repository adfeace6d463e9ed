"""What the stage loops share (issue 23 builds this out): the errors a step raises."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; training stops and the last good checkpoint stays."""
