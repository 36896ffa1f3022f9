"""mmkv: fast, small-memory question answering over long videos with HuggingFace VLMs.

    import mmkv
    print(mmkv.generate("video.mp4", "What happens after the red car stops?", recipe="kivi:2"))

    pipe = mmkv.load("Qwen/Qwen2.5-VL-7B-Instruct", recipe="kivi:2")
    enc = pipe.encode("video.mp4", fps=1, max_frames=256)   # encode once ...
    for q in questions:
        r = pipe.ask(enc, q)                                # ... ask many
        print(r.text, r.stats.kv_bytes)
"""
from .api import generate, load
from .errors import InputError, MmkvError, ModelError, RecipeError
from .pipeline import Encoded, Pipeline
from .recipe import PRESETS, Recipe
from .stats import Result, Stats

__version__ = "0.1.0"
__all__ = ["generate", "load", "Pipeline", "Encoded", "Recipe", "PRESETS", "Result", "Stats", "MmkvError",
           "InputError", "ModelError", "RecipeError", "__version__"]
