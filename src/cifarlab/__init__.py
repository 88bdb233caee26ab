"""cifarlab: train, tune, evaluate and compare image classifiers on CIFAR-10 and image folders."""

__version__ = "0.1.0"


def load(run_dir):
    """Load a trained run for prediction: ``cifarlab.load("runs/x").predict(images)``."""
    from .predict import Predictor

    return Predictor.from_run(run_dir)
