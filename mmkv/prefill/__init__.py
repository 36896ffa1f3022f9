"""Prefill policies (sparse attention while the prompt is prefilled)."""
from .base import PrefillPolicy
from .zipvl import ZipVL, zipvl_session

__all__ = ["PrefillPolicy", "ZipVL", "zipvl_session"]
