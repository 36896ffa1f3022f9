"""The Gradio demo for long videos (`mmkv demo`, or `python apps/demo.py`).

- `mmkv.demo.core`: the logic without Gradio (upload checks, models, encodings, streamed answers,
  pictures), testable without a browser.
- `mmkv.demo.app`: the Gradio Blocks (`build_app`) and a server (`launch`, `close`).

Gradio is imported only when the app is built, so `import mmkv.demo` works without it.
"""
from .core import Demo, DemoConfig, check_upload, recipe_choices


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
