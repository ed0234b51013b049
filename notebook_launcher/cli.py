"""Command line: ``python -m notebook_launcher demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m notebook_launcher", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="a short CPU (or GPU) training launched through the library")
    demo.add_argument("-n", "--num-processes", type=int, default=2)
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--display", default="text", choices=["text", "none", "auto"])
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        result = demo_main(num_processes=args.num_processes, epochs=args.epochs, display=args.display)
        return 0 if result["test_accuracy"] > 0.8 else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
