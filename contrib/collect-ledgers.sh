#!/bin/bash
# Collect node ledgers on the head node (see docs/head-node.md): a thin wrapper that
# maps this environment onto `sparkctl collect`.
#
#   collect-ledgers.sh                 fetch every node's whole ledger to $SPARK_COLLECT/<node>.db
#   collect-ledgers.sh --merge         fetch what is new since the last merge, then merge it
#                                      into $SPARK_CLUSTER_DB (nightly: spark-merge.service)
#   collect-ledgers.sh --checkpoints   fetch what the witness has not seen, then hand each
#                                      node's newest signed checkpoint and its consistency
#                                      proof to the witness (every 15 min: spark-checkpoint.service)
#
# Over ssh (key-based, BatchMode), a node the head node already holds runs `sparkctl ledger
# export --after SEQ --proof-from SIZE --out -` and streams back a segment: its records past
# the head's position, its newest checkpoint and the proof from what the witness cosigned,
# so what travels follows what is new. A node not held yet (and the plain fetch) sends an
# SQLite online backup of its whole ledger (`sparkctl ledger snapshot`). Neither disturbs
# the running daemon; the node daemon's clock is compared with the head node's on the way.
# With SPARK_SHARED set, each node writes its own snapshot to $SPARK_SHARED/<node>.db
# instead (e.g. from its own timer) and this script copies it whole. Nodes are fetched in
# parallel.
#
# Environment:
#   SPARK_NODES_FILE  node list, one name per line (default /etc/spark/nodes.list; when
#                     missing, `sinfo -h -N -o %N` is asked). List the slurmctld host too:
#                     its ledger holds the submit-time denials.
#   SPARK_LEDGER      live ledger path on the nodes (default /var/lib/spark/ledger.db)
#   SPARK_SOCKET      sparkd's socket on the nodes (default /run/spark/sparkd.sock)
#   SPARK_COLLECT     where copies land on the head node (default /var/lib/spark/collect)
#   SPARK_SHARED      shared directory instead of ssh (optional)
#   SPARK_SSH         ssh command (default "ssh -o BatchMode=yes -o ConnectTimeout=10")
#   SPARKCTL          sparkctl on the nodes and here (default sparkctl)
#   SPARK_KEYS        trusted node keys, <node>.pub/.hmac (default /etc/spark/nodes)
#   SPARK_WITNESS     witness state directory (default /var/lib/spark/witness)
#   SPARK_CLUSTER_DB  merged cluster ledger (default /var/lib/spark/cluster.db)
#   SPARK_MAX_SKEW    seconds a node's clock may be off (default 2)
# A node that cannot be reached is reported on stderr and skipped; the exit status is 1
# when any node failed, so the timer's journal shows it, but the others are collected.
set -u -o pipefail

NODES_FILE=${SPARK_NODES_FILE:-/etc/spark/nodes.list}
SPARKCTL=${SPARKCTL:-sparkctl}
KEYS=${SPARK_KEYS:-/etc/spark/nodes}
WITNESS=${SPARK_WITNESS:-/var/lib/spark/witness}
MODE=${1:-snapshots}

args=(--dest "${SPARK_COLLECT:-/var/lib/spark/collect}"
      --ledger "${SPARK_LEDGER:-/var/lib/spark/ledger.db}"
      --socket "${SPARK_SOCKET:-/run/spark/sparkd.sock}"
      --remote-sparkctl "$SPARKCTL" --max-skew "${SPARK_MAX_SKEW:-2}"
      --ssh "${SPARK_SSH:-ssh -o BatchMode=yes -o ConnectTimeout=10}")
[ -n "${SPARK_SHARED:-}" ] && args+=(--shared "$SPARK_SHARED")
if [ -r "$NODES_FILE" ]; then
    args+=(--nodes-file "$NODES_FILE")
else
    for node in $(sinfo -h -N -o %N | sort -u); do args+=(--node "$node"); done
fi
case "$MODE" in
    --merge) args+=(--keys "$KEYS" --witness-state "$WITNESS"
                    --into "${SPARK_CLUSTER_DB:-/var/lib/spark/cluster.db}" --json) ;;
    --checkpoints) args+=(--keys "$KEYS" --witness-state "$WITNESS" --cosign) ;;
    snapshots) ;;
    *) echo "usage: $0 [--merge | --checkpoints]" >&2; exit 2 ;;
esac
exec "$SPARKCTL" collect "${args[@]}"
