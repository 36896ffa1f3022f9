"""Visual-token presses: compression before the LLM."""
from .base import VisionContext, VisionPress, VisualTokens
from .evs import EVS
from .globalcom2 import GlobalCom2
from .pooling import Pool
from .pvc import PVC
from .randkeep import RandomKeep

__all__ = ["VisionContext", "VisionPress", "VisualTokens", "PVC", "GlobalCom2", "EVS", "Pool", "RandomKeep"]
