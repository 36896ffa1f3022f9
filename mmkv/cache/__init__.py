"""The compressed KV cache and the KV presses that fill it."""
from .base import SEPARATOR, TEXT, VISUAL, KVPress, PressContext
from .bilevel import BiLevel
from .core import CompressedCache, KVLayer, QuantSegment
from .elastic import ElasticCache
from .kivi import KIVI
from .lookm import LOOKM
from .quant import QuantTensor, pack, quantize, unpack
from .streaming import StreamingLLM
from .vidkv import VidKV, VidKVSegment

__all__ = ["CompressedCache", "KVLayer", "QuantSegment", "KVPress", "PressContext", "KIVI", "StreamingLLM",
           "LOOKM", "ElasticCache", "QuantTensor", "pack", "unpack", "quantize", "TEXT", "VISUAL", "SEPARATOR",
           "VidKV", "VidKVSegment", "BiLevel"]
