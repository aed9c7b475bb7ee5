"""What the cluster check scripts share: a private token-protected LocalCluster, a connected driver, one
JSON line of observations on stdout."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any


def progress(script: str, what: str) -> None:
    """A progress line on stderr (the test shows it when it fails)."""
    print(f"{script}: {what}", file=sys.stderr, flush=True)


def run_on_cluster(script: str, checks: Callable[[Any, str], dict[str, Any]], **cluster: Any) -> int:
    """Start ``LocalCluster(**cluster)``, connect, print ``checks(cluster, base_dir)`` as JSON, stop everything."""
    base = tempfile.mkdtemp(prefix=f"insitu-{script}-")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.join(base, "auth_token")
    from insitu.cluster.local import LocalCluster

    with LocalCluster(base_dir=base, **cluster) as c:
        import ray

        progress(script, f"cluster {c.address} up")
        ray.init(address=c.address, namespace="insitu", logging_level="ERROR", log_to_driver=False)
        try:
            results = checks(c, base)
        finally:
            ray.shutdown()  # before the cluster stops
    print(json.dumps(results))
    return 0
