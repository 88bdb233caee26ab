"""``cifarlab models``: the registered models with their parameter counts."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models", description="List registered models, their "
                       "parameter counts (10 classes, default hyperparameters) and hyperparameters.")
    p.add_argument("--config", "-c", metavar="YAML", help="also count the model of this config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import count_parameters, create_model, list_models, model_defaults

    print(f"{'model':<12}{'params':>12}  hyperparameters (defaults)")
    for name in list_models():
        n = count_parameters(create_model(name, 10))
        hp = ", ".join(f"{k}={v}" for k, v in model_defaults(name).items())
        print(f"{name:<12}{n:>12,}  {hp}")
    print(f"{'timm/<arch>':<12}{'':>12}  any of timm's models (model.name: timm/resnet18, ...; "
          f"pip install 'cifarlab[timm]')")
    if args.config:
        from ..config import load_config
        from ..models import build_model

        cfg = load_config(args.config)
        size = cfg.data.image_size
        if size is None:  # the data sets it when the run starts; a count needs one (the models' default)
            cfg.data.image_size = 32
        print(f"\n{args.config}: {cfg.model.name} {count_parameters(build_model(cfg, 10)):,} parameters"
              f"{' (at 32 px: data.image_size follows the data)' if size is None else ''}")
    return 0
