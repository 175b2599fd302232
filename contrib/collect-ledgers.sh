#!/bin/bash
# Collect node ledgers on the head node (see docs/head-node.md).
#
#   collect-ledgers.sh                 snapshot every node's live ledger and copy it to
#                                      $SPARK_COLLECT/<node>.db
#   collect-ledgers.sh --merge         collect, then `sparkctl merge` them all into
#                                      $SPARK_CLUSTER_DB (nightly: spark-merge.service)
#   collect-ledgers.sh --checkpoints   collect, then hand each node's newest signed checkpoint
#                                      to `sparkctl witness` (every 15 min: spark-checkpoint)
#
# On each node, `sparkctl ledger snapshot` takes an SQLite online backup, so the running
# daemon is never disturbed; the snapshot is then pulled with rsync over ssh, or read
# from a shared filesystem when SPARK_SHARED is set (the node writes its snapshot to
# $SPARK_SHARED/<node>.db itself, e.g. from its own timer, and this script copies it).
#
# Environment:
#   SPARK_NODES_FILE  node list, one name per line (default /etc/spark/nodes.list;
#                     when missing, `sinfo -h -N -o %N` is asked)
#   SPARK_LEDGER      live ledger path on the nodes (default /var/lib/spark/ledger.db)
#   SPARK_COLLECT     where snapshots land on the head node (default /var/lib/spark/collect)
#   SPARK_SHARED      shared directory instead of ssh (optional)
#   SPARK_SSH         ssh command (default "ssh -o BatchMode=yes -o ConnectTimeout=10")
#   SPARKCTL          sparkctl on the nodes and here (default sparkctl)
#   SPARK_KEYS        trusted node keys, <node>.pub/.hmac (default /etc/spark/nodes)
#   SPARK_WITNESS     witness state directory (default /var/lib/spark/witness)
#   SPARK_CLUSTER_DB  merged cluster ledger (default /var/lib/spark/cluster.db)
# A node that cannot be reached is reported on stderr and skipped; the exit status is 1
# when any node failed, so the timer's journal shows it, but the others are collected.
set -u -o pipefail

NODES_FILE=${SPARK_NODES_FILE:-/etc/spark/nodes.list}
LEDGER=${SPARK_LEDGER:-/var/lib/spark/ledger.db}
COLLECT=${SPARK_COLLECT:-/var/lib/spark/collect}
SSH=${SPARK_SSH:-ssh -o BatchMode=yes -o ConnectTimeout=10}
SPARKCTL=${SPARKCTL:-sparkctl}
KEYS=${SPARK_KEYS:-/etc/spark/nodes}
WITNESS=${SPARK_WITNESS:-/var/lib/spark/witness}
CLUSTER_DB=${SPARK_CLUSTER_DB:-/var/lib/spark/cluster.db}
MODE=${1:-snapshots}

nodes() {
    if [ -r "$NODES_FILE" ]; then
        grep -v '^[[:space:]]*\(#\|$\)' "$NODES_FILE"
    else
        sinfo -h -N -o %N | sort -u
    fi
}

mkdir -p "$COLLECT"
failed=0
collected=()
for node in $(nodes); do
    case "$node" in *[!A-Za-z0-9._-]*) echo "skipping odd node name: $node" >&2; continue;; esac
    tmp="$COLLECT/.$node.db.part"
    rm -f "$tmp"
    if [ -n "${SPARK_SHARED:-}" ]; then
        if ! cp -- "$SPARK_SHARED/$node.db" "$tmp"; then
            echo "$node: no snapshot in $SPARK_SHARED" >&2; failed=1; continue
        fi
    else
        remote="/tmp/spark-snapshot-$node.db"
        # shellcheck disable=SC2086
        if ! $SSH "$node" "rm -f $remote && $SPARKCTL ledger snapshot $LEDGER $remote" >/dev/null; then
            echo "$node: snapshot failed" >&2; failed=1; continue
        fi
        # keep the previous copy as rsync's basis so only changed pages travel
        [ -f "$COLLECT/$node.db" ] && cp -- "$COLLECT/$node.db" "$tmp"
        if ! rsync -q --inplace -e "$SSH" "$node:$remote" "$tmp"; then
            echo "$node: copy failed" >&2; failed=1; continue
        fi
    fi
    mv -f -- "$tmp" "$COLLECT/$node.db"
    collected+=("$node=$COLLECT/$node.db")
    if [ "$MODE" = "--checkpoints" ]; then
        cp_file="$COLLECT/$node.checkpoint"
        if ! "$SPARKCTL" ledger checkpoint "$COLLECT/$node.db" > "$cp_file.part"; then
            echo "$node: no checkpoint yet" >&2; failed=1; continue
        fi
        mv -f -- "$cp_file.part" "$cp_file"
        # the proof from the last witnessed size is computed from the fresh snapshot
        if ! "$SPARKCTL" witness --state "$WITNESS" --keys "$KEYS" --ledger "$COLLECT/$node.db" \
                "$cp_file" >/dev/null; then
            failed=1
        fi
    fi
done
if [ "$MODE" = "--merge" ] && [ "${#collected[@]}" -gt 0 ]; then
    "$SPARKCTL" merge --into "$CLUSTER_DB" --keys "$KEYS" --witness-state "$WITNESS" --json \
        "${collected[@]}" || failed=1
fi
exit $failed
