"""Model adapters (one per family) and model loading."""
from .base import ADAPTERS, Adapter, Prompt, supported_model_types
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .loading import DEFAULT_MODEL, load_adapter, resolve_model
from .qwen2_vl import QwenVLAdapter

__all__ = ["ADAPTERS", "Adapter", "Prompt", "supported_model_types", "QwenVLAdapter", "LlavaOnevisionAdapter",
           "LlavaNextAdapter", "load_adapter", "resolve_model", "DEFAULT_MODEL"]
