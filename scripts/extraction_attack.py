#!/usr/bin/env python3
"""The equation-solving model-extraction attack of Tramer et al., "Stealing
Machine Learning Models via Prediction APIs" (USENIX Security 2016), run
against `warden serve`, for the tests and for docs/serving.md.

For multinomial logistic regression, log(p_c / p_r) = (w_c - w_r) . x + (b_c - b_r)
for every class c and a reference class r: each answer with probabilities is
a set of linear equations in the unknown weights, and d + 1 random queries
with full-precision confidences recover the model exactly. Rounded or
truncated confidences lose equations (a probability rounded to 0 has no
logarithm) and make the rest noisy; labels alone give none, so for them the
attacker falls back to training a model of its own on the labels.

Usage:
  extraction_attack.py --url https://127.0.0.1:8443 --key KEY --model MODEL_DIR
                       --test-images t10k-images-idx3-ubyte.gz --queries 1000

MODEL_DIR is the served model (read only to measure agreement: the attack
itself sees nothing but the API). Prints one JSON line:
  {"queries": N, "answered": M, "agreement": A, "stopped": "..."}
"""

import argparse
import gzip
import json
import ssl
import struct
import sys
import urllib.error
import urllib.request

import numpy as np


def load_model(model_dir):
    """The served softmax model's weights (d x k) and bias (k), from safetensors."""
    with open(f"{model_dir}/model.safetensors", "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    torch_layout = header.get("__metadata__", {}).get("layout") == "torch"
    body = data[8 + n :]

    def tensor(name):
        t = header[name]
        a, b = t["data_offsets"]
        return np.frombuffer(body[a:b], dtype="<f4").reshape(t["shape"])

    if "fc1.weight" in header:
        sys.exit("the equation-solving attack targets logistic regression (a softmax model)")
    w = tensor("fc0.weight").astype(np.float64)
    # The file keeps weights [out, in] like torch.nn.Linear (older files: [in, out]).
    return (w.T if torch_layout else w), tensor("fc0.bias").astype(np.float64)


def load_idx_images(path, limit):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    count, rows, cols = struct.unpack(">III", raw[4:16])
    count = min(count, limit)
    x = np.frombuffer(raw[16 : 16 + count * rows * cols], dtype=np.uint8)
    return x.reshape(count, rows * cols).astype(np.float64) / 255.0


class Api:
    def __init__(self, url, key, cacert):
        self.url = url.rstrip("/") + "/v1/predict"
        self.key = key
        self.ctx = ssl.create_default_context(cafile=cacert) if cacert else ssl._create_unverified_context()

    def ask(self, batch):
        body = json.dumps({"inputs": [[round(float(v), 6) for v in x] for x in batch]}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST")
        req.add_header("Authorization", f"Bearer {self.key}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
                return json.loads(r.read())["predictions"], None
        except urllib.error.HTTPError as e:
            return None, f"HTTP {e.code}: {e.read().decode(errors='replace')}"


def solve(xs, answers, d, k):
    """Least squares on the log-ratio equations, against one reference class r:
    log(p_c / p_r) = (w_c - w_r) . x + (b_c - b_r) for each class c, one small
    independent system per class (the paper's formulation). An answer helps
    class c only when both p_c and p_r survived the rounding and the top-k cut."""
    present = np.zeros(k)
    tables = []
    for a in answers:
        probs = {t["class"]: t["probability"] for t in a.get("top", []) if t["probability"] > 0}
        tables.append(probs)
        for c in probs:
            present[c] += 1
    ref = int(np.argmax(present))
    w = np.zeros((d, k))
    b = np.zeros(k)
    xb_all = np.hstack([np.array(xs), np.ones((len(xs), 1))])
    for c in range(k):
        if c == ref:
            continue
        idx = [i for i, p in enumerate(tables) if c in p and ref in p]
        if not idx:
            # Never seen beside the reference: the class is unreachable to the copy.
            b[c] = -1e9
            continue
        y = np.array([np.log(tables[i][c] / tables[i][ref]) for i in idx])
        theta, *_ = np.linalg.lstsq(xb_all[idx], y, rcond=None)
        w[:, c] = theta[:d]
        b[c] = theta[d]
    return w, b


def retrain(xs, labels, d, k, steps=300, lr=0.5):
    """Label-only fallback: multinomial logistic regression on the answers."""
    x = np.array(xs)
    y = np.eye(k)[np.array(labels)]
    w, b = np.zeros((d, k)), np.zeros(k)
    for _ in range(steps):
        z = x @ w + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - y) / len(x)
        w -= lr * (x.T @ g)
        b -= lr * g.sum(axis=0)
    return w, b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--model", required=True, help="served model dir, for measuring agreement only")
    ap.add_argument("--test-images", required=True)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--cacert", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--natural",
        action="store_true",
        help="send real test images instead of random inputs (what an honest client does), for the detector",
    )
    a = ap.parse_args()

    w_true, b_true = load_model(a.model)
    d, k = w_true.shape
    test = load_idx_images(a.test_images, 2000)
    served = np.argmax(test @ w_true + b_true, axis=1)

    rng = np.random.default_rng(a.seed)
    api = Api(a.url, a.key, a.cacert)
    xs, answers, stopped = [], [], None
    while len(xs) < a.queries:
        size = min(a.batch, a.queries - len(xs))
        if a.natural:
            start = len(xs) % len(test)
            batch = test[start : start + size]
        else:
            batch = rng.random((size, d))
        got, err = api.ask(batch)
        if got is None:
            stopped = err
            break
        xs.extend(batch)
        answers.extend(got)

    agreement = 0.0
    if answers:
        if any("top" in x for x in answers):
            model = solve(xs, answers, d, k)
        else:
            model = retrain(xs, [x["label"] for x in answers], d, k)
        if model is not None:
            w, b = model
            agreement = float(np.mean(np.argmax(test @ w + b, axis=1) == served))
    print(json.dumps({"queries": a.queries, "answered": len(answers), "agreement": agreement, "stopped": stopped}))


if __name__ == "__main__":
    main()
