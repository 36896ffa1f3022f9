"""Prefill policies (sparse attention while the prompt is prefilled)."""
from .base import PrefillPolicy

__all__ = ["PrefillPolicy"]
