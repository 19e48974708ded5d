"""A command-line progress bar: tqdm when installed, else one line per step on stderr."""
from __future__ import annotations

import sys


def progress(items, desc: str = "", unit: str = "it"):
    items = list(items)
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain(items, desc, unit)
    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def _plain(items, desc, unit):
    for i, item in enumerate(items, 1):
        print(f"{desc}: {i}/{len(items)} {unit} ({item})", file=sys.stderr, flush=True)
        yield item
