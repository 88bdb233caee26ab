"""``cifarlab`` entry point: parses the verb, runs it, and turns user errors into one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import CifarlabError

# One module per verb under cifarlab.cli; each defines add_parser(subparsers) and run(args).
VERBS = ["train", "evaluate", "models", "data", "report", "compare", "sweep", "predict", "export", "lr_find"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors are usage errors: exit 2, one line
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cifarlab", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for verb in VERBS:
        try:
            module = importlib.import_module(f".{verb}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{verb}":  # verb not built yet
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except CifarlabError as e:
        print(f"cifarlab: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        print("cifarlab: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)


if __name__ == "__main__":
    main()
