"""Logistic regression in plain numpy, trained through warden's parameter servers.

Run by `warden launch configs/byo-numpy.toml --local`, once per worker rank:
each rank reads its share of the Fashion-MNIST images, computes gradients
of softmax regression with numpy, pushes them to the servers (which apply
the job's optimizer to the sum over workers) and gets the new weights.
The gradients are computed straight into memory shared with the warden
agent, and the weights arrive in it: no copies. The data directory is the
first argument.
"""

import os
import sys
import time

import numpy as np

from warden import idx, kv


def load(data_dir, split):
    prefix = "train" if split == "train" else "t10k"
    x = idx.read(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz")).reshape(-1, 784).astype(np.float32) / 255.0
    y = idx.read(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    return x, y


def loss_and_grads(w, b, x, y, gw=None, gb=None):
    """The mean loss and its gradients (written into `gw` and `gb` if given)."""
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return loss, np.matmul(x.T, p, out=gw), p.sum(axis=0, out=gb)


def main():
    data_dir = sys.argv[1]
    rank, workers = int(os.environ["WARDEN_RANK"]), int(os.environ["WARDEN_NUM_WORKERS"])
    epochs, batch = int(os.environ["WARDEN_EPOCHS"]), int(os.environ["WARDEN_BATCH_SIZE"])
    seed = int(os.environ["WARDEN_SEED"])
    x, y = load(data_dir, "train")
    # Every rank runs the same number of steps (sync mode waits for all).
    per_rank = len(x) // workers
    x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
    steps = per_rank // batch
    tx, ty = load(data_dir, "test") if rank == 0 else (None, None)

    store = kv.connect()
    w = np.random.default_rng(seed).normal(0, 0.01, size=(784, 10)).astype(np.float32)
    b = np.zeros(10, dtype=np.float32)
    store.init("w", w)
    store.init("b", b)
    # Arrays in memory shared with the agent: gradients go out from
    # `grads`, the servers' new weights arrive in `params`.
    shared = store.share()
    w, b = shared.params["w"], shared.params["b"]
    gw, gb = shared.grads["w"], shared.grads["b"]
    store.pull("w", out=w)  # worker 0's values, on every rank
    store.pull("b", out=b)
    for epoch in range(1, epochs + 1):
        order = np.random.default_rng([seed, rank, epoch]).permutation(len(x))
        started, losses = time.time(), []
        for s in range(steps):
            i = order[s * batch : (s + 1) * batch]
            loss, _, _ = loss_and_grads(w, b, x[i], y[i], gw, gb)
            losses.append(loss)
            store.push("w", gw)
            store.push("b", gb)  # the step's last push: w and b now hold the new weights
        report = {"samples": steps * batch}
        if rank == 0:
            test_loss, _, _ = loss_and_grads(w, b, tx, ty)
            acc = float(((tx @ w + b).argmax(axis=1) == ty).mean())
            report.update(test_loss=test_loss, test_accuracy=acc)
            print(f"epoch {epoch}: test accuracy {acc:.4f} ({time.time() - started:.1f}s)", flush=True)
        store.report(epoch, float(np.mean(losses)), **report)


if __name__ == "__main__":
    main()
