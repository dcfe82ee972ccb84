"""IDX files (the MNIST / Fashion-MNIST format), gzip-compressed or raw, as
numpy arrays; what the examples read the shipped data with.

    from warden import idx
    images = idx.read("data/fashion-mnist-small/train-images-idx3-ubyte.gz")  # (N, 28, 28) uint8
"""

import gzip
import struct

import numpy as np


def read(path):
    """The array in an IDX file of unsigned bytes (type 0x08)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
