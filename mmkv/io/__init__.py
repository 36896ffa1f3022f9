"""Video and image input: `load_media` opens anything mmkv accepts and samples frames lazily."""
from .video import (
    DEFAULT_FRAMES,
    Media,
    check_sampling,
    load_media,
    probe,
    sample_indices,
)

__all__ = ["DEFAULT_FRAMES", "Media", "check_sampling", "load_media", "probe", "sample_indices"]
