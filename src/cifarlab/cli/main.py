"""``cifarlab`` entry point: parses the verb, runs it, and turns user errors into one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import CifarlabError

# One module per verb under cifarlab.cli; each defines add_parser(subparsers) and run(args).
VERBS = ["train", "evaluate", "models", "data", "report", "compare", "sweep", "predict", "export", "study", "lr_find",
         "serve", "audit"]

DESCRIPTION = """\
cifarlab trains, tunes, evaluates and compares image classifiers on CIFAR-10 or any image folder
(ResNet18, a small CNN, a Vision Transformer and faster nets), on a CPU or a GPU. A run is a folder
(runs/NAME) with its config, metrics per epoch, best weights and checkpoint; every other command
reads such folders: evaluate and report them, compare several, predict with one or export it.
Sweeps search hyperparameters (W&B sweep files, run on Optuna), data shows the data set."""

EPILOG = """\
example:
  cifarlab train -c configs/cnn.yaml --epochs 2 --name quick   # writes runs/quick/
  cifarlab evaluate runs/quick                                 # test accuracy (plain and with the run's TTA)
  cifarlab report runs/quick                                   # runs/quick/report/report.html
  cifarlab predict runs/quick photo.png

`cifarlab COMMAND --help` shows a command's flags. Config keys (--set section.key=value) are in
src/cifarlab/config.py; recipes in configs/. Errors print one line and exit with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors are usage errors: exit 2, one line
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cifarlab", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
