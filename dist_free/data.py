"""``python -m dist_free.data``: dataset chores, a thin CLI over the ``pipelines`` package.

    python -m dist_free.data demo data/digits               # the README's demo dataset
    python -m dist_free.data demo demo_cifar --format cifar10-py   # the same digits as CIFAR-10
    python -m dist_free.data verify /data/imagenet          # list every file a pipeline would choke on
    python -m dist_free.data prepare /data/imagenet --val-labels val_synsets.txt

``verify`` exits 1 when it finds anything, 2 when the root itself is unusable. ``prepare`` writes
ROOT/val_list.txt for ImageNet's flat val folder (no images are copied); the loaders then read it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines import DataError, prepare_flat_val, scan
from pipelines.datasets import SPLITS
from pipelines.demo import DEMO_SIZE, write_demo


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dist_free.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="decode every image and list the bad ones")
    verify.add_argument("root")
    verify.add_argument("--split", choices=SPLITS, action="append",
                        help="split to scan (repeatable; default: every split present)")
    verify.add_argument("--workers", type=int, default=None, help="decoding processes")
    demo = commands.add_parser("demo", help="write the digits demo dataset as JPEGs")
    demo.add_argument("out")
    demo.add_argument("--size", type=int, default=DEMO_SIZE, help="image side in pixels")
    demo.add_argument("--val-fraction", type=float, default=0.2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--format", choices=("jpeg", "cifar10-py", "cifar10-bin"), default="jpeg",
                      help="JPEGs in class folders (default), or a CIFAR-10 folder at 32x32 "
                           "(the python version pickled as the distributed files are)")
    prepare = commands.add_parser("prepare", help="file list for ImageNet's flat val folder")
    prepare.add_argument("root")
    prepare.add_argument("--val-labels", required=True,
                         help="one 'label' per line in sorted file order, or 'filename label'; "
                              "a label is a synset (class folder name) or a 0-based class index")
    prepare.add_argument("--split", default="val", choices=SPLITS)
    return parser.parse_args(argv)


def run_verify(args) -> int:
    problems = scan(args.root, tuple(args.split or SPLITS), workers=args.workers)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) found in {args.root}", file=sys.stderr)
    return 1 if problems else 0


def run_demo(args) -> int:
    # Checked before anything is written: the writer would fail halfway, leaving a folder that
    # the next (corrected) command refuses as not empty.
    if not 8 <= args.size <= 1024:
        raise DataError(f"--size must be between 8 and 1024 pixels, got {args.size}")
    if not 0 < args.val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.format != "jpeg":
        from pipelines.cifar_demo import write_cifar_demo
        counts = write_cifar_demo(args.out, args.format, args.val_fraction, args.seed)
        print(f"wrote {counts['train']} train and {counts['val']} test images as {args.format} "
              f"to {args.out}")
        return 0
    counts = write_demo(args.out, args.size, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val JPEGs to {args.out}")
    return 0


def run_prepare(args) -> int:
    labels = Path(args.val_labels)
    try:
        labels.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"--val-labels {labels}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--val-labels {labels}: not a readable text file ({e})") from None
    path = prepare_flat_val(args.root, args.val_labels, args.split)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    command = {"verify": run_verify, "demo": run_demo, "prepare": run_prepare}[args.command]
    try:
        return command(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
