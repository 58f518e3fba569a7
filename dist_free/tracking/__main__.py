"""`python -m dist_free.tracking replay RUN_DIR [--uri URI]`: send what a run's sessions could not.

Exit status: 0 everything delivered (torn or garbled lines are skipped and reported), 1 items
remain (server down, items MLflow rejected, a log in use by a running tracker), 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dist_free.tracking.journal import WAL_DIR
from dist_free.tracking.uploader import replay
from dist_free.tracking.uri import TrackingConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_free.tracking",
                                     description="MLflow tracking utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    rep = commands.add_parser("replay", help=f"send what RUN_DIR/{WAL_DIR}/ holds to MLflow")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--uri", help="tracking URI (default: the one each session was logging to)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = replay(args.run_dir, args.uri)
    except (FileNotFoundError, TrackingConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report(results)


def report(results) -> int:
    """One line per log that still holds something or had problems; the exit status."""
    status = 0
    for r in results:
        if r.problems:
            print(f"{r.path}: skipped {len(r.problems)} torn or garbled line(s): "
                  + "; ".join(r.problems[:5]),
                  file=sys.stderr)
        if r.busy:
            print(f"{r.path}: in use by a running tracker or replay; not touched", file=sys.stderr)
        elif r.error or r.left:
            why = f" ({r.error})" if r.error else ""
            print(f"{r.path}: {r.left} item(s) still unsent{why}", file=sys.stderr)
        for line in r.rejected:
            print(f"rejected, kept: {line}", file=sys.stderr)
        if r.busy or r.error or r.left:
            status = 1
    delivered = sum(r.delivered for r in results)
    if status == 0:
        print(f"all MLflow items delivered ({delivered})")
    return status


if __name__ == "__main__":
    sys.exit(main())
