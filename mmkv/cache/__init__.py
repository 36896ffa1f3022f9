"""The compressed KV cache and the KV presses that fill it."""
from .base import SEPARATOR, TEXT, VISUAL, KVPress, PressContext
from .bilevel import BiLevel
from .core import CompressedCache, KVLayer, QuantSegment
from .elastic import ElasticCache
from .evict import EvictionPress
from .expected import ExpectedAttention
from .kivi import KIVI
from .lookm import LOOKM
from .observed import ObservedAttention
from .quant import QuantTensor, pack, quantize, unpack
from .ragged import RaggedSegment
from .snapkv import AdaKV, SnapKV
from .streaming import StreamingLLM
from .vidkv import VidKV, VidKVSegment

__all__ = ["CompressedCache", "KVLayer", "QuantSegment", "KVPress", "PressContext", "KIVI", "StreamingLLM",
           "LOOKM", "ElasticCache", "QuantTensor", "pack", "unpack", "quantize", "TEXT", "VISUAL", "SEPARATOR",
           "VidKV", "VidKVSegment", "EvictionPress", "ObservedAttention", "SnapKV", "AdaKV", "ExpectedAttention",
           "RaggedSegment", "BiLevel"]
