"""Bi-level KV (Video-XL-2, arXiv 2506.19225): chunked prefill, a sparse level per chunk on the
device, the dense level offloaded, and per-question reload of the chunks a question needs."""
from .render import chunks_html, chunks_image
from .stage import BiLevel, device_bytes

__all__ = ["BiLevel", "chunks_html", "chunks_image", "device_bytes"]
