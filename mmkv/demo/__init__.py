"""The Gradio demo for long videos (`mmkv demo`, or `python apps/demo.py`).

- The logic without Gradio, testable without a browser: `config` (`DemoConfig`), `uploads`
  (upload checks and the upload folder), `state` (models, encodings, streamed answers),
  `session` (a tab's chat and queue of questions), `thumbs` (kept-token thumbnails), `render`
  and `labels` (the stats cards' HTML and words); `core` gathers them all.
- `mmkv.demo.app`: the Gradio Blocks (`build_app`) and a server (`launch`, `close`).

Gradio is imported only when the app is built, so `import mmkv.demo` works without it.
"""
from .config import DemoConfig
from .state import Demo, recipe_choices
from .uploads import check_upload


def build_app(config: DemoConfig | None = None, demo: Demo | None = None):
    from .app import build_app as _build

    return _build(config, demo)


def launch(config: DemoConfig | None = None, **kwargs):
    from .app import launch as _launch

    return _launch(config, **kwargs)


def close(app) -> None:
    from .app import close as _close

    _close(app)


__all__ = ["Demo", "DemoConfig", "build_app", "launch", "close", "check_upload", "recipe_choices"]
