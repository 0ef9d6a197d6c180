"""The ``fasttune`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["port"]:  # before the top-level parser, so `fasttune port -h` shows port's own help
        from fasttune.port import main as port

        return port(argv[1:])
    parser = argparse.ArgumentParser(prog="fasttune", description="fast, memory-light fine-tuning")
    parser.add_argument("command", choices=["quickstart", "port"],
                        help="quickstart: train a tiny model offline end to end; "
                             "port PATH.ipynb|.py [-o OUT] [--force]: rewrite an Unsloth notebook's imports for fasttune")
    args, rest = parser.parse_known_args(argv)
    if args.command == "quickstart":
        from fasttune.quickstart.__main__ import main as quickstart

        return quickstart(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
