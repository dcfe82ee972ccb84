"""warden's Python client: your own training program, warden's parameter servers.

    from warden import kv
    store = kv.connect()            # the agent's socket, from WARDEN_KV
    store.init("w", w)              # worker 0's values are the servers' start
    store.push("w", grad_w)         # a step pushes every tensor once
    store.pull("w", out=w)          # then pulls the updated values

See docs/byo.md.
"""

from . import idx, kv  # noqa: F401

__all__ = ["idx", "kv"]
