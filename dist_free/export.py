"""The `export` command: a training checkpoint as weights plus a model card (dist_free.publish.card).

    python -m dist_free.export runs/free/checkpoints/best.pt export/ [--report eval.json] [--force]

OUT receives model.safetensors, model.pt, model_card.json, MODEL_CARD.md and model_info.json
(RobustBench's layout); see dist_free.publish.card for what each holds and how the card is filled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_free import checkpoint
from dist_free.publish.card import ExportError
from dist_free.publish.export import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_free.export", description=(
        "Export a training checkpoint as safetensors + torch weights and a model card."))
    parser.add_argument("checkpoint", type=Path, help="a training checkpoint (.pt)")
    parser.add_argument("out", type=Path, help="the folder to write (new, or empty)")
    parser.add_argument("--report", type=Path, help="python -m dist_free.evaluate's JSON report "
                        "for this checkpoint: the card's robust accuracy")
    parser.add_argument("--force", action="store_true", help="replace an earlier export in OUT")
    args = parser.parse_args(argv)
    try:
        paths = export_checkpoint(args.checkpoint, args.out, args.report, args.force)
    except (ExportError, checkpoint.CheckpointError) as e:
        # One line: torch's unpickling errors, quoted in CheckpointError, span a dozen.
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
