"""Exceptions users see."""


class CapabilityError(RuntimeError):
    """The loaded checkpoint lacks the part a call needs (e.g. retrieval on a generation-only model)."""
