"""The demo's logic without Gradio, gathered from its modules (kept so that
`from mmkv.demo.core import ...` goes on working):

- `config`:  `DemoConfig` and the size / duration formatters.
- `uploads`: `check_upload`, `UploadDir`, `user_message`.
- `state`:   `Demo` (models, encodings, streamed answers), recipe and preset listings, what a
             model can answer (`model_note`).
- `session`: a browser tab's chat and queue of questions (`Session`, `run_job`).
- `thumbs`:  the kept-token thumbnails.
- `render`:  the HTML of the stats cards and the status box; `labels`: words for stats keys.
"""
from .config import ASSETS, DEFAULT_MODEL, SAMPLE_META, SAMPLE_VIDEO, DemoConfig, human_bytes, human_seconds, parse_size
from .render import CSS, layers_html, memory_html, stats_rows, status_html, timing_html, tokens_html
from .session import Job, Session, Settings, run_job
from .state import Demo, model_note, preset_rows, recipe_choices, sample_question, stage_rows
from .thumbs import overlay, thumbnails
from .uploads import (BROWSER_CODECS, Sweeper, UploadDir, UploadInfo, check_upload, image_format, user_message,
                      video_codec)

__all__ = ["Demo", "DemoConfig", "UploadDir", "UploadInfo", "check_upload", "recipe_choices", "stage_rows",
           "preset_rows", "thumbnails", "overlay", "tokens_html", "memory_html", "layers_html", "timing_html",
           "status_html", "stats_rows", "parse_size", "user_message", "sample_question", "human_bytes",
           "human_seconds", "video_codec", "BROWSER_CODECS", "CSS", "SAMPLE_VIDEO", "SAMPLE_META", "ASSETS",
           "DEFAULT_MODEL", "Session", "Settings", "Job", "run_job", "model_note", "Sweeper", "image_format"]
