"""One process of MXNet's `dist_sync` parameter server, for scripts/bench-mxnet.

Its role comes from ps-lite's variables (DMLC_ROLE, DMLC_PS_ROOT_URI,
DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER, DMLC_NUM_WORKER), set by the script.
A worker pushes a gradient of P floats and pulls the result, ITERS untimed
warm-up steps then ITERS timed ones, and prints one line in the format of
`warden bench ps` (bytes pushed plus pulled by this worker per second, as
f32). With a third argument `2bit` the kvstore compresses pushes with
MXNet's 2-bit scheme (threshold 0.5, its default).
Schedulers and servers block inside `mx.kv.create` until the job ends.
"""

import os
import sys
import time

import mxnet as mx


def main():
    params, iters = int(float(sys.argv[1])), int(sys.argv[2])
    compression = sys.argv[3] if len(sys.argv) > 3 else "none"
    kv = mx.kv.create("dist_sync")
    if os.environ.get("DMLC_ROLE") != "worker":
        return
    if compression == "2bit":
        kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    grad = mx.nd.ones((params,)) * 1e-3
    out = mx.nd.zeros((params,))
    kv.init(0, mx.nd.zeros((params,)))
    for _ in range(iters):
        kv.push(0, grad)
        kv.pull(0, out=out)
    out.wait_to_read()
    start = time.perf_counter()
    for _ in range(iters):
        kv.push(0, grad)
        kv.pull(0, out=out)
    out.wait_to_read()
    secs = time.perf_counter() - start
    steps = iters / secs
    gbps = steps * params * 4 * 2 / 1e9
    print(
        f"mxnet ps: W={kv.num_workers} S={os.environ['DMLC_NUM_SERVER']} P={params} "
        f"compression={compression} rank={kv.rank} steps_per_s={steps:.2f} worker_GBps={gbps:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
