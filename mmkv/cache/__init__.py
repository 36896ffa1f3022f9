"""The compressed KV cache and the KV presses that fill it."""
from .base import SEPARATOR, TEXT, VISUAL, KVPress, PressContext
from .core import CompressedCache, KVLayer, QuantSegment
from .kivi import KIVI
from .quant import QuantTensor, pack, quantize, unpack
from .streaming import StreamingLLM

__all__ = ["CompressedCache", "KVLayer", "QuantSegment", "KVPress", "PressContext", "KIVI", "StreamingLLM",
           "QuantTensor", "pack", "unpack", "quantize", "TEXT", "VISUAL", "SEPARATOR"]
