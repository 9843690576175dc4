"""``peftkit fetch-data``: download and cache the VADER movie-review sentences (once)."""

from __future__ import annotations

import argparse
from typing import Any

from ..data import VADER_REQUIREMENT, fetch_vader, vader_path
from .common import status


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fetch-data", help="download and cache the VADER movie-review data (once)")
    p.add_argument("--cache-dir", help="default: $PEFTKIT_CACHE or ~/.cache/peftkit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not vader_path(args.cache_dir).is_file():
        status(f"downloading the {VADER_REQUIREMENT} sdist from PyPI ...")
    print(fetch_vader(args.cache_dir))
    return 0
