"""The local KV endpoint of a warden worker agent.

Your program runs as one worker rank of a warden job (`[worker] command` in
the job file). It talks only to the agent beside it, over a Unix socket that
only the job user can open; the agent forwards pushes and pulls to the
parameter servers over the job's mutual-TLS connections. Your program never
sees a certificate, a key or a network socket of the job.

Semantics are MXNet's `dist_sync` / `dist_async` kvstore: every worker calls
`init` for the job's tensors (worker 0's values are used); a *step* pushes
every tensor declared in `[model.tensors]` once, in any order; the servers
aggregate the workers' gradients and apply the job's optimizer; `pull`
returns the values after your newest complete step (sync) or the current
values (async). Errors from the agent are raised as `KVError` with the
agent's message.

Tensors do not travel through the socket when the agent can copy them
straight from and into this process's memory (it can for the program it
started; not for a child process of it, nor when the system forbids it):
then a push or pull costs one memory copy, done by the kernel. Set
`WARDEN_KV_DIRECT=0` to send them on the socket regardless.

Fastest of all, `share()` maps memory the agent shares with this process:
arrays of every tensor's gradient and parameters that the agent sends from
and receives into directly. Compute the gradient into `shared.grads[name]`,
push it, and the new values appear in `shared.params[name]`: nothing is
copied on this side. This works in child processes of the program too.
"""

import json
import mmap
import os
import socket
import struct
import time
import warnings

import numpy as np

__all__ = ["KVError", "KV", "Shared", "connect"]

_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


class KVError(RuntimeError):
    """The agent refused an operation; the message says why."""


def _recv_exact(sock, n, into=None):
    buf = into if into is not None else bytearray(n)
    view = memoryview(buf).cast("B")
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise KVError("the warden agent closed the KV connection (the job stopped?)")
        got += k
    return buf


class Shared:
    """Memory shared with the agent (`KV.share()`): `grads` and `params`,
    {name: float32 array of the tensor's shape}, views of one mapping.

    Write a step's gradient into `grads[name]` (compute into it, or
    `np.copyto`) and push that very array: the agent sends it from there.
    The push that completes a step returns once the new values are in
    `params`; pulling into `params[name]` costs nothing. The agent writes
    `params` only during a push or pull of this job's; treat `params` as
    read-only (what you write there is overwritten by the next step)."""

    def __init__(self, grads, params, mapping):
        self.grads = grads
        self.params = params
        self._mapping = mapping

    def holds(self, region, name, arr):
        """Whether `arr` is this memory's `region` array of `name` itself."""
        view = getattr(self, region).get(name)
        return (
            view is not None
            and isinstance(arr, np.ndarray)
            and arr.dtype == np.float32
            and arr.ctypes.data == view.ctypes.data
            and arr.nbytes == view.nbytes
        )


class KV:
    """A connection to the agent's KV socket. Use `connect()`."""

    def __init__(self, path=None, timeout=60.0):
        path = path or os.environ.get("WARDEN_KV")
        if not path:
            raise KVError("WARDEN_KV is not set: run this program through `warden launch` ([worker] command)")
        self.path = path
        self._warned_init = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise KVError(f"no warden agent listens on {path}")
                time.sleep(0.05)
        self._shapes = None
        self._shared = None
        self._direct = False
        if os.environ.get("WARDEN_KV_DIRECT", "1") != "0":
            probe = np.zeros(1, dtype=np.uint64)
            try:
                answer = self._call({"op": "hello", "probe": probe.ctypes.data})[0]
                self._direct = bool(answer.get("direct"))
            except KVError:
                pass  # an agent without direct copies

    @property
    def direct(self):
        """Whether tensors go straight between this process's memory and
        the agent (otherwise through the socket)."""
        return self._direct

    def close(self):
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, header, payload=None, into=None):
        """One request. The payload (a C-contiguous array) and the answer
        (into `into`, a C-contiguous float32 array of the right size, when
        given) are copied by the agent straight from and into this
        process's memory when it can, else sent from and received into
        those buffers on the socket: large tensors are not copied on this
        side either way. `payload` must stay alive until this returns."""
        nbytes = 0 if payload is None else payload.nbytes
        header = dict(header, nbytes=nbytes)
        direct = self._direct
        if direct and nbytes:
            header["from"] = payload.ctypes.data
        if direct and into is not None and not header.get("into_shared"):
            header.update(into=into.ctypes.data, into_nbytes=into.nbytes)
        h = json.dumps(header).encode()
        self._sock.sendall(struct.pack("<I", len(h)) + h)
        if nbytes and not direct:
            self._sock.sendall(memoryview(payload).cast("B"))
        (n,) = struct.unpack("<I", _recv_exact(self._sock, 4))
        answer = json.loads(bytes(_recv_exact(self._sock, n)))
        if not answer.get("ok"):
            raise KVError(answer.get("error", "the agent refused the operation"))
        if into is not None and answer.get("written") == into.nbytes:
            return answer, None
        nbytes = answer.get("nbytes", 0)
        if into is not None and into.nbytes == nbytes:
            _recv_exact(self._sock, nbytes, into)
            return answer, None
        return answer, _recv_exact(self._sock, nbytes)

    # -- what the job declares -------------------------------------------
    @property
    def rank(self):
        return self._call({"op": "rank"})[0]["rank"]

    @property
    def num_workers(self):
        return self._call({"op": "num_workers"})[0]["num_workers"]

    def shapes(self):
        """{name: shape} of every tensor in [model.tensors]."""
        if self._shapes is None:
            t = self._call({"op": "tensors"})[0]["tensors"]
            self._shapes = {x["name"]: tuple(x["shape"]) for x in t}
        return self._shapes

    def _bytes(self, name, value):
        arr = np.ascontiguousarray(value)
        dtype = _DTYPES.get(arr.dtype)
        if dtype is None:
            arr = arr.astype(np.float32)
            dtype = "f32"
        shape = self.shapes().get(name)
        if shape is not None and arr.size != int(np.prod(shape)):
            raise KVError(f"`{name}` has shape {shape}; got an array of {arr.size} values")
        return dtype, arr

    def share(self):
        """Maps the memory the agent shares with this process (made the
        first time any connection asks; the same for every connection) and
        returns it as a `Shared`. Call it between steps."""
        if self._shared is not None:
            return self._shared
        h = json.dumps({"op": "share", "nbytes": 0}).encode()
        self._sock.sendall(struct.pack("<I", len(h)) + h)
        # The agent's descriptor of the memory rides with the answer's first bytes.
        head, fds, _, _ = socket.recv_fds(self._sock, 4, 1, socket.MSG_CMSG_CLOEXEC)
        try:
            if not head:
                raise KVError("the warden agent closed the KV connection (the job stopped?)")
            head += bytes(_recv_exact(self._sock, 4 - len(head)))
            (n,) = struct.unpack("<I", head)
            answer = json.loads(bytes(_recv_exact(self._sock, n)))
            if not answer.get("ok"):
                raise KVError(answer.get("error", "the agent refused to share memory"))
            if len(fds) != 1:
                raise KVError("the agent's answer to share came without its memory")
            offset = answer["params_offset"]
            mapping = mmap.mmap(fds[0], 2 * offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            for fd in fds:
                os.close(fd)
        grads, params = {}, {}
        for t in answer["tensors"]:
            shape, at = tuple(t["shape"]), 4 * t["offset"]
            count = int(np.prod(shape, dtype=np.int64))
            grads[t["name"]] = np.frombuffer(mapping, np.float32, count, at).reshape(shape)
            params[t["name"]] = np.frombuffer(mapping, np.float32, count, offset + at).reshape(shape)
        self._shared = Shared(grads, params, mapping)
        return self._shared

    # -- the kvstore -----------------------------------------------------
    def init(self, name, value):
        """Declares the starting value of `name` (worker 0's is used). In a
        job with `[model] init` the servers start from the signed weights
        instead: the value is ignored, with a warning the first time."""
        dtype, data = self._bytes(name, value)
        answer, _ = self._call({"op": "init", "name": name, "dtype": dtype}, data)
        if answer.get("ignored") and not self._warned_init:
            self._warned_init = True
            warnings.warn(answer["ignored"], stacklevel=2)

    def push(self, name, grad):
        """Pushes this step's gradient of `name`."""
        if self._shared is not None and self._shared.holds("grads", name, grad):
            self._call({"op": "push", "name": name, "shared": True})
            return
        dtype, data = self._bytes(name, grad)
        self._call({"op": "push", "name": name, "dtype": dtype}, data)

    def pull(self, name, out=None):
        """The current value of `name` (into `out` if given)."""
        into = self._into(name, out)
        header = dict({"op": "pull", "name": name, "dtype": "f32"}, **self._into_shared(name, into))
        _, data = self._call(header, into=into)
        return self._unpack(name, data, out, into)

    def pushpull(self, name, grad, out=None):
        """push, then pull (the pull needs the step complete: use it for the last tensor)."""
        into = self._into(name, out)
        header = dict({"op": "pushpull", "name": name}, **self._into_shared(name, into))
        if self._shared is not None and self._shared.holds("grads", name, grad):
            _, data = self._call(dict(header, shared=True), into=into)
        else:
            dtype, payload = self._bytes(name, grad)
            _, data = self._call(dict(header, dtype=dtype), payload, into=into)
        return self._unpack(name, data, out, into)

    def _into_shared(self, name, into):
        """The header field that leaves the answer in the shared parameters
        when `into` is their array of `name`."""
        if self._shared is not None and self._shared.holds("params", name, into):
            return {"into_shared": True}
        return {}

    def _into(self, name, out):
        """Where the answer can land as it is: `out` itself when it is a
        writable C-contiguous float32 array, a new array of the tensor's
        shape when there is no `out`; else None (received, then converted)."""
        if out is None:
            shape = self.shapes().get(name)
            return None if shape is None else np.empty(shape, dtype=np.float32)
        if isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable:
            return out
        return None

    def step(self, grads, out=None):
        """Pushes every gradient in `grads` ({name: array}) and pulls every
        tensor back: one complete step. Returns {name: array} (or fills `out`)."""
        for name, g in grads.items():
            self.push(name, g)
        out = out if out is not None else {}
        for name in self.shapes():
            out[name] = self.pull(name, out=out.get(name))
        return out

    def barrier(self):
        """Waits until every worker reaches its barrier."""
        self._call({"op": "barrier"})

    def report(self, epoch, train_loss, test_loss=None, test_accuracy=None, samples=None):
        """Records an epoch in the run's metrics.csv (every worker reports its
        train loss; one also reports the test figures)."""
        h = {"op": "report", "epoch": int(epoch), "train_loss": float(train_loss)}
        if test_loss is not None and test_accuracy is not None:
            h.update(test_loss=float(test_loss), test_accuracy=float(test_accuracy))
        if samples is not None:
            h["samples"] = int(samples)
        self._call(h)

    def _unpack(self, name, data, out, into):
        if data is None:  # received into `into` already
            return into
        arr = np.frombuffer(data, dtype=np.float32)
        shape = self.shapes().get(name)
        if shape is not None:
            arr = arr.reshape(shape)
        if out is None:
            return arr.copy()
        np.copyto(out, arr.reshape(np.shape(out)), casting="same_kind")
        return out

    # -- PyTorch ---------------------------------------------------------
    def torch_step(self, model):
        """One step for a PyTorch module whose parameter names match
        [model.tensors]: pushes every parameter's .grad, then writes the
        updated values back into the parameters."""
        import torch  # only needed here

        params = dict(model.named_parameters())
        for name, p in params.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            self.push(name, g.detach().cpu().numpy())
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(torch.from_numpy(self.pull(name)).reshape(p.shape))

    def torch_init(self, model):
        """init() every parameter of a PyTorch module from its current
        values, then loads the values the servers start from (worker 0's)
        into the module, so every rank begins from the same weights."""
        import torch  # only needed here

        params = dict(model.named_parameters())
        for name, p in params.items():
            self.init(name, p.detach().cpu().numpy())
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(torch.from_numpy(self.pull(name)).reshape(p.shape))


def connect(path=None, timeout=60.0):
    """Connects to the agent (WARDEN_KV), waiting up to `timeout` seconds for it."""
    return KV(path, timeout)
