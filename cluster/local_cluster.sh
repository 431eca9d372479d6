#!/usr/bin/env bash
# The local multi-node Ray cluster (cluster/local_cluster.py): a head and worker nodes on this machine, token
# auth, an MLflow server on 127.0.0.1; `stop` ends exactly the processes it started. See cluster/README.md.
#   bash cluster/local_cluster.sh start [--workers 1] [--head-cpus 1] [--worker-cpus 1] [--workdir W]
#   bash cluster/local_cluster.sh status | env | kill-node w1 | add-node | stop
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python cluster/local_cluster.py "$@"
