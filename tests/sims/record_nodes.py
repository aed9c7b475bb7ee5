"""Record the Ray cluster's node resources to a file, then exec the rest of the command line.

Used by the launch tests as an analytics prefix: ``record_nodes.py FILE python .../analytics/heat_stats.py ...``.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    out, rest = sys.argv[1], sys.argv[2:]
    import ray

    ray.init(address=os.environ["INSITU_ADDRESS"], logging_level="ERROR", log_to_driver=False, configure_logging=False)
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
        nodes = [{"ip": n["NodeManagerAddress"], "resources": sorted(n["Resources"])} for n in alive]
    finally:
        ray.shutdown()
    with open(out, "w") as fh:
        json.dump(nodes, fh)
    os.execvp(rest[0], rest)


if __name__ == "__main__":
    sys.exit(main())
