"""`mmkv bench ...`: benchmark subcommands."""
from __future__ import annotations

import argparse
import importlib

# name -> (module with add_arguments(parser) and main(args), help)
BENCHES = {
    "quality": ("mmkv.bench.quality", "accuracy vs compression on held-out synthetic needle videos"),
}


def add_parser(sub, name: str, helptext: str) -> None:
    p = sub.add_parser(name, help=helptext)
    bsub = p.add_subparsers(dest="bench", required=True)
    for bname, (module, bhelp) in BENCHES.items():
        mod = importlib.import_module(module)
        bp = bsub.add_parser(bname, help=bhelp, description=mod.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(bp)
        bp.set_defaults(func=mod.main)
