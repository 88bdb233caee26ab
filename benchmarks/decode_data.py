"""Decode a data set once, so that the runs after it read the decoded cache (used by the GPU session scripts).

    python benchmarks/decode_data.py DATA_PATH
"""

import sys
import time

from cifarlab.config import DataConfig
from cifarlab.data import load_data

t = time.perf_counter()
d = load_data(DataConfig(path=sys.argv[1]))
print(len(d.train_x), "train", len(d.val_x), "val", len(d.test_x), "test, decoded in",
      round(time.perf_counter() - t, 1), "s")
