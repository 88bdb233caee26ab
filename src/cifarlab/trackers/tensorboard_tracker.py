"""TensorBoard: event files in ``RUN_DIR/tensorboard``; ``tensorboard --logdir runs`` shows every run.

Written with PyTorch's own :class:`torch.utils.tensorboard.SummaryWriter` (it needs the
``tensorboard`` package for the event-file format).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .base import Tracker, epoch_metrics


class TensorBoardTracker(Tracker):
    name = "tensorboard"
    module = "tensorboard"

    def start(self, run_dir: Path, config: dict[str, Any], resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        done = _epochs_done(run_dir) if resumed else 0
        # purge_step drops events an interrupted run wrote after its last checkpoint, so a resumed curve has no doubles.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=done + 1 if resumed else None)
        if not resumed:
            # Indented: a Markdown code block, as TensorBoard's text plugin renders Markdown.
            text = "    " + yaml.safe_dump(config, sort_keys=False).rstrip().replace("\n", "\n    ")
            self.writer.add_text("config", text, global_step=0)

    def log_epoch(self, row: dict[str, Any]) -> None:
        for k, v in epoch_metrics(row).items():
            self.writer.add_scalar(k, v, global_step=int(row["epoch"]))
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"final/{k}", v, global_step=0)

    def log_figures(self, paths: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for p in paths:
            with Image.open(p) as im:
                self.writer.add_image(f"report/{p.stem}", np.asarray(im.convert("RGB")), global_step=0,
                                      dataformats="HWC")

    def log_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.writer.add_text(k, v, global_step=0)

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


def _epochs_done(run_dir: Path) -> int:
    import csv

    f = run_dir / "metrics.csv"
    if not f.is_file():
        return 0
    with open(f, newline="") as fh:
        return max((int(r["epoch"]) for r in csv.DictReader(fh)), default=0)
