"""Training: the loop (:mod:`.loop`), optimizers and schedules, checkpoints, runtime, DDP."""

from .loop import fit, train_one_epoch  # noqa: F401
