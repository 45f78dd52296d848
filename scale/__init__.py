"""Past one GPU: one engine per GPU as Ray Serve replicas, behind the same front (the optional `scale` extra).

Only app.py imports this package, and only when asked for replicas: the single-GPU service never imports Ray."""

import os

# Read when Ray is imported. The replicas' lines reach the front's log as written: no colour codes around their
# prefix, and none left out as "repeated across cluster" (N engines write lines that look alike). And, as for the
# model libraries (pipeline/offline.py), nothing is sent out of the machine: no usage statistics.
os.environ.setdefault("RAY_COLOR_PREFIX", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Token authentication, said outright rather than left to Ray's guess: a private cluster makes its token if there is
# none (~/.ray/auth_token), and a joined one (--ray-address) is reached with the token its head was started with
# (RAY_AUTH_TOKEN_PATH, or that same file; deploy/supervisor/ray-node.conf). RAY_AUTH_MODE=disabled opts out.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Only scale.start connects to Ray. Left on, Ray's auto-connect made a call that reached Ray after ray.shutdown()
# (from a Serve handle's thread as the front stops) start a new local cluster from that thread, and the front's exit
# then waited 10-60 s for that cluster's worker to give up (seen in the --replicas 2 end-to-end test).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from scale.cluster import ScaleError, shutdown, start  # noqa: E402  (after the environment above)
from scale.remote_engine import RemoteEngine, RemoteResult, ReplicaLost  # noqa: E402

__all__ = ["RemoteEngine", "RemoteResult", "ReplicaLost", "ScaleError", "shutdown", "start"]
