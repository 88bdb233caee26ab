"""Data: sources (official archive, image folder), decode cache, split, batches.

The whole data set is decoded once into uint8 arrays (cached on disk beside a
fingerprint of the source), split with a seeded stratified split, and kept as
uint8 tensors on the training device; batches are sliced by ``randperm``,
normalized and augmented as whole tensors (see :mod:`cifarlab.data.augment`).
"""

from .dataset import ImageData, load_data, resolve_source  # noqa: F401
from .registry import RawData  # noqa: F401
