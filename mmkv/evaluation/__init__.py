"""Batch evaluation: prompts and answer extraction as lmms-eval does them, runners, scoring."""
from .prompts import videomme_prompt

__all__ = ["videomme_prompt"]
