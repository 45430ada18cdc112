"""The sampler's error type: bad input whose message says what to fix."""

from __future__ import annotations

__all__ = ["SamplingError"]


class SamplingError(ValueError):
    """Bad input to the sampler (prompts, runs, weights, settings); the message says what to fix."""
