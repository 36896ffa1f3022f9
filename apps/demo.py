"""The mmkv Gradio demo: upload a long video and chat about it (encode once, ask many).

    python apps/demo.py [options]      # the same as `mmkv demo [options]`; see `mmkv demo -h`

The app itself lives in the package (`mmkv.demo`), so an installed mmkv serves it too.
"""
import sys

from mmkv.demo_cli import main

if __name__ == "__main__":
    sys.exit(main())
