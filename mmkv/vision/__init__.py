"""Visual-token presses: compression before the LLM."""
from .base import VisionContext, VisionPress, VisualTokens

__all__ = ["VisionContext", "VisionPress", "VisualTokens"]
