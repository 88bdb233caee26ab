"""Training: the loop (:mod:`.loop`), optimizers and schedules, checkpoints, runtime, DDP."""

from .loop import build_model, evaluate, fit, predict_logits, train_one_epoch  # noqa: F401
