"""Loads a model warden trained into PyTorch as it is, and checks it.

    python scripts/torch_load.py RUN_DIR

Builds the nn.Sequential of docs/model-format.md for the model in
RUN_DIR/model (widths from the tensors' shapes), loads the file with
load_state_dict(strict=True) (every name and shape must match, nothing
transposed by hand), and computes the test accuracy on the shipped test
data. Prints it beside the accuracy warden reported in RUN_DIR/summary.json
and exits 1 if they differ (by more than one
input in a thousand, near-ties that float rounding may tip). Run by scripts/bench-torch.
"""
import json
import struct
import sys
from collections import OrderedDict

import numpy as np
import torch

sys.path.insert(0, "python")  # the warden client, from this repository
from warden import idx  # noqa: E402


def state_dict(model_dir):
    """The file's tensors (safetensors read with the standard library)."""
    with open(f"{model_dir}/model.safetensors", "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n :]
    out = OrderedDict()
    for name, t in header.items():
        a, b = t["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(body[a:b], dtype="<f4").reshape(t["shape"]).copy())
    return out


def warden_mlp(widths):
    """warden's built-in model: Linear layers fc0, fc1, ... with ReLU between."""
    layers = OrderedDict()
    for i in range(len(widths) - 1):
        layers[f"fc{i}"] = torch.nn.Linear(widths[i], widths[i + 1])
        if i + 2 < len(widths):
            layers[f"relu{i}"] = torch.nn.ReLU()
    return torch.nn.Sequential(layers)


def main():
    run = sys.argv[1]
    state = state_dict(f"{run}/model")
    weights = [state[f"fc{i}.weight"] for i in range(len(state) // 2)]
    widths = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    model = warden_mlp(widths)
    model.load_state_dict(state, strict=True)
    model.eval()
    x = idx.read("data/fashion-mnist-small/t10k-images-idx3-ubyte.gz").reshape(-1, widths[0]).astype(np.float32)
    y = idx.read("data/fashion-mnist-small/t10k-labels-idx1-ubyte.gz").astype(np.int64)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x / 255.0)).argmax(dim=1).numpy()
    accuracy = float((predicted == y).mean())
    with open(f"{run}/summary.json") as f:
        reported = json.load(f)["test_accuracy"]
    # Summation order differs from warden's SGEMM, so an input at a near-tie
    # may fall the other way: allow one in a thousand.
    same = abs(accuracy - reported) <= 1e-3
    print(
        f"torch load: {'-'.join(map(str, widths))} load_state_dict(strict=True) ok, "
        f"test accuracy {accuracy:.4f} in PyTorch, {reported:.4f} in warden: {'same' if same else 'DIFFERENT'}",
        flush=True,
    )
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
