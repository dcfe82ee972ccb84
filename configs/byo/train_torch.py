"""A PyTorch MLP trained through warden's parameter servers.

Run by `warden launch configs/byo-torch.toml --local`, once per worker rank.
The parameter names of the module match [model.tensors] in the job file;
`store.torch_step(model)` pushes every gradient and loads the servers'
updated values after each backward pass. Needs torch and numpy for the job
user's python3 (docs/byo.md).
"""

import gzip
import os
import struct
import sys

import numpy as np
import torch
from torch import nn

from warden import kv


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(data_dir, prefix):
    x = idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz")).reshape(-1, 784).astype(np.float32) / 255.0
    y = idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def main():
    data_dir = sys.argv[1]
    rank, workers = int(os.environ["WARDEN_RANK"]), int(os.environ["WARDEN_NUM_WORKERS"])
    epochs, batch = int(os.environ["WARDEN_EPOCHS"]), int(os.environ["WARDEN_BATCH_SIZE"])
    torch.manual_seed(int(os.environ["WARDEN_SEED"]))
    x, y = load(data_dir, "train")
    per_rank = len(x) // workers
    x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
    steps = per_rank // batch
    tx, ty = load(data_dir, "t10k")

    # Names: fc1.weight [256, 784], fc1.bias [256], fc2.weight [10, 256], fc2.bias [10].
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(784, 256))
    model.add_module("relu", nn.ReLU())
    model.add_module("fc2", nn.Linear(256, 10))
    store = kv.connect()
    store.torch_init(model)
    store.barrier()
    with torch.no_grad():  # everyone starts from worker 0's weights
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(store.pull(name)).reshape(p.shape))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x))
        losses = []
        for s in range(steps):
            i = order[s * batch : (s + 1) * batch]
            model.zero_grad()
            loss = loss_fn(model(x[i]), y[i])
            loss.backward()
            store.torch_step(model)
            losses.append(loss.item())
        with torch.no_grad():
            out = model(tx)
            test_loss = loss_fn(out, ty).item()
            acc = (out.argmax(dim=1) == ty).float().mean().item()
        print(f"epoch {epoch}: test accuracy {acc:.4f}", flush=True)
        store.report(epoch, float(np.mean(losses)), test_loss=test_loss, test_accuracy=acc, samples=steps * batch)


if __name__ == "__main__":
    main()
