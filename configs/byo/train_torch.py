"""A PyTorch MLP trained through warden's parameter servers.

Run by `warden launch configs/byo-torch.toml --local`, once per worker rank:
each rank reads its share of the Fashion-MNIST images and computes
gradients with PyTorch on the CPU; `store.torch_step` pushes them to the
servers (which apply the job's optimizer to the sum over workers) and
loads the new weights. The data directory is the first argument.
"""

import os
import sys
import time

import numpy as np
import torch

from warden import idx, kv


def load(data_dir, split):
    prefix = "train" if split == "train" else "t10k"
    x = idx.read(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz")).reshape(-1, 784).astype(np.float32) / 255.0
    y = idx.read(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def main():
    data_dir = sys.argv[1]
    rank, workers = int(os.environ["WARDEN_RANK"]), int(os.environ["WARDEN_NUM_WORKERS"])
    epochs, batch = int(os.environ["WARDEN_EPOCHS"]), int(os.environ["WARDEN_BATCH_SIZE"])
    seed = int(os.environ["WARDEN_SEED"])
    torch.set_num_threads(1)  # the ranks share the host's cores
    torch.manual_seed(seed)
    x, y = load(data_dir, "train")
    # Every rank runs the same number of steps (sync mode waits for all).
    per_rank = len(x) // workers
    x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
    steps = per_rank // batch
    tx, ty = load(data_dir, "test") if rank == 0 else (None, None)

    # Parameter names ("0.weight", ...) match [model.tensors] in the job file.
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    loss_fn = torch.nn.CrossEntropyLoss()
    store = kv.connect()
    store.torch_init(model)  # worker 0's weights, on every rank
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + rank * 100 + epoch))
        started, losses = time.time(), []
        for s in range(steps):
            i = order[s * batch : (s + 1) * batch]
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[i]), y[i])
            loss.backward()
            losses.append(loss.item())
            store.torch_step(model)
        report = {"samples": steps * batch}
        if rank == 0:
            with torch.no_grad():
                logits = model(tx)
                test_loss = loss_fn(logits, ty).item()
                acc = (logits.argmax(dim=1) == ty).float().mean().item()
            report.update(test_loss=test_loss, test_accuracy=acc)
            print(f"epoch {epoch}: test accuracy {acc:.4f} ({time.time() - started:.1f}s)", flush=True)
        store.report(epoch, float(np.mean(losses)), **report)


if __name__ == "__main__":
    main()
