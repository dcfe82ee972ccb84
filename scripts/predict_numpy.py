#!/usr/bin/env python3
"""A warden model's class probabilities, from its model.safetensors alone.

Reads the file with nothing but the standard library and numpy and computes
what torch.nn.Linear would: each layer fc{i} is y = x @ W.T + b with W of
shape [out, in], ReLU between layers, softmax at the end (dropout is off at
inference). It shows a built-in model is an ordinary PyTorch MLP, and the
tests use it to check that `warden serve` answers exactly that.

    predict_numpy.py MODEL_DIR < inputs.json     # [[x0, x1, ...], ...]

prints a JSON list with one list of probabilities per input.
"""

import json
import struct
import sys

import numpy as np


def load(model_dir):
    with open(f"{model_dir}/model.safetensors", "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    if meta.get("layout") != "torch":
        sys.exit("this file predates the PyTorch layout (weights [out, in]); load it with warden")
    body = data[8 + n :]

    def tensor(name):
        t = header[name]
        if t["dtype"] != "F32":
            sys.exit(f"{name} is {t['dtype']}, expected F32")
        a, b = t["data_offsets"]
        return np.frombuffer(body[a:b], dtype="<f4").reshape(t["shape"]).astype(np.float64)

    layers = []
    while f"fc{len(layers)}.weight" in header:
        i = len(layers)
        layers.append((tensor(f"fc{i}.weight"), tensor(f"fc{i}.bias")))
    return layers


def predict(layers, x):
    h = np.asarray(x, dtype=np.float64)
    for k, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if k + 1 < len(layers):
            h = np.maximum(h, 0.0)
    h = h - h.max(axis=1, keepdims=True)
    e = np.exp(h)
    return e / e.sum(axis=1, keepdims=True)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    layers = load(sys.argv[1])
    x = json.load(sys.stdin)
    print(json.dumps(predict(layers, x).tolist()))


if __name__ == "__main__":
    main()
