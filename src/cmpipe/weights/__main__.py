"""``python -m cmpipe.weights [inception|lpips] [--net NET]``: prepare the offline weights once
(``make setup`` runs it) and print the files' paths; exit status 1 with what to install otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cmpipe.weights.offline import MissingAssetError

LPIPS_NETS = ("alex", "vgg")


def prepare_inception() -> list[Path]:
    from cmpipe.weights.inception import inception_path

    return [inception_path(repair=True)]  # replaces a cached file of the wrong hash


def prepare_lpips(nets: tuple[str, ...] = LPIPS_NETS) -> list[Path]:
    from cmpipe.weights import lpips  # imports torch and lpips: only when asked for

    return lpips.prepare(nets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cmpipe.weights",
        description="Make the offline weights loadable (converting them once) and print their paths: "
                    "the Inception for FID and KID, and the LPIPS backbones.")
    parser.add_argument("which", nargs="?", choices=("all", "inception", "lpips"), default="all",
                        help="which weights (default: all)")
    parser.add_argument("--net", choices=LPIPS_NETS, default=None,
                        help="only this LPIPS backbone (default: both)")
    args = parser.parse_args(argv)
    if args.net and args.which == "inception":
        parser.error("--net is an LPIPS backbone; it does not go with inception")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    steps = []
    if args.which in ("all", "inception"):
        steps.append(prepare_inception)
    if args.which in ("all", "lpips"):
        steps.append(lambda: prepare_lpips((args.net,) if args.net else LPIPS_NETS))
    try:
        for step in steps:
            for path in step():
                print(path)
    except MissingAssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
