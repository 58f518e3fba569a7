"""`python -m dist_free.tracking replay RUN_DIR [--uri URI]`: send what a run could not."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dist_free.tracking.unsent import UNSENT_FILE, replay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_free.tracking",
                                     description="MLflow tracking utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    rep = commands.add_parser("replay", help=f"send RUN_DIR/{UNSENT_FILE} to MLflow")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--uri", help="tracking URI (default: the one the run was logging to)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        left = replay(args.run_dir, args.uri)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if left:
        print(f"{left} items still unsent; they remain in {args.run_dir / UNSENT_FILE}",
              file=sys.stderr)
        return 1
    print(f"all unsent MLflow items from {args.run_dir} delivered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
