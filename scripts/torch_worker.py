"""The worker compute of `warden bench worker` in PyTorch on the CPU: the
same MLP (784-HIDDEN-10, ReLU), batch, loss (softmax cross-entropy), SGD
step and batch schedule, on the shipped Fashion-MNIST sample.

    python scripts/torch_worker.py HIDDEN BATCH STEPS THREADS

Prints: torch worker: mlp 784-H-10 batch=B threads=T samples_per_s=.. step_ms=..
Run by scripts/bench-torch.
"""
import sys
import time

import numpy as np
import torch

sys.path.insert(0, "python")  # the warden client, from this repository
from warden import idx  # noqa: E402


def main():
    hidden, batch, steps, threads = (int(a) for a in sys.argv[1:5])
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    x = idx.read("data/fashion-mnist-small/train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    y = idx.read("data/fashion-mnist-small/train-labels-idx1-ubyte.gz").astype(np.int64)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    model = torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = len(y)
    b = min(batch, n)

    def step(i):
        start = (i * b) % (n - b + 1)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[start : start + b]), y[start : start + b])
        loss.backward()
        opt.step()

    for i in range(20):
        step(i)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    secs = time.perf_counter() - t
    print(
        f"torch worker: mlp 784-{hidden}-10 batch={b} threads={threads} "
        f"samples_per_s={steps * b / secs:.0f} step_ms={secs * 1e3 / steps:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
