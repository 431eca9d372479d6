#!/usr/bin/env bash
# Start (or stop) a local Ray cluster for `ray job submit`: a head node on 127.0.0.1 plus, optionally,
# extra worker nodes on the same machine so multi-node code paths run for real.
#   bash cluster/local_cluster.sh start [extra_worker_nodes] [cpus_per_node]
#   bash cluster/local_cluster.sh stop
# Ray 2.60 enables token auth on a local head: job submission then needs RAY_AUTH_MODE=token
# (the token is written to ~/.ray/auth_token).
set -euo pipefail
cd "$(dirname "$0")/.."
# The job entrypoint runs `python` from the head's PATH: make it this venv's.
export PATH="$PWD/.venv/bin:$PATH"
RAY=.venv/bin/ray
case "${1:-start}" in
  start)
    workers=${2:-0}
    cpus=${3:-$(nproc)}
    "$RAY" start --head --node-ip-address 127.0.0.1 --port 6379 --dashboard-host 127.0.0.1 \
      --dashboard-port 8265 --num-cpus "$cpus" --disable-usage-stats
    for _ in $(seq 1 "$workers"); do
      "$RAY" start --address 127.0.0.1:6379 --node-ip-address 127.0.0.1 --num-cpus "$cpus"
    done
    # The dashboard answers a few seconds after `ray start` returns; wait for it before printing the
    # submit line (its job agent may still need a moment more: Ray then says 'try again later').
    for _ in $(seq 1 60); do
      RAY_AUTH_MODE=token "$RAY" job list --address http://127.0.0.1:8265 >/dev/null 2>&1 && break
      sleep 1
    done
    echo "submit with: RAY_AUTH_MODE=token $RAY job submit --address http://127.0.0.1:8265 --working-dir . -- python pipeline/run.py --stage all --workdir $PWD/work"
    ;;
  stop)
    # `ray stop` has no per-cluster form: it stops every Ray process on this machine, including a local
    # Ray that a `pipeline/run.py` without RAY_ADDRESS started for itself.
    "$RAY" stop --force
    ;;
  *)
    echo "usage: $0 start [extra_worker_nodes] [cpus_per_node] | stop" >&2
    exit 2
    ;;
esac
