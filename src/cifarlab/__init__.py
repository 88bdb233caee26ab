"""cifarlab: train, tune, evaluate and compare image classifiers on CIFAR-10 and image folders."""

__version__ = "0.1.0"


def load(run_dir, tta=None, device="auto"):
    """Load a trained run for prediction: ``cifarlab.load("runs/x").predict(images)``.

    ``tta`` (none | flip | flip_translate) defaults to the test-time augmentation ``cifarlab evaluate``
    used, so predictions reproduce the reported accuracy; ``tta="none"`` is one view per image."""
    # Imported here, not above: `import cifarlab` (every CLI start, `cifarlab --help`) must not import torch.
    from .predict import Predictor

    return Predictor.from_run(run_dir, device=device, tta=tta)
