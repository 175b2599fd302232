"""Records forged by someone holding the node's HMAC key K[0]: each one hashes and is
MAC'd right, so only where it sits (its seq, what it links to, whose it is) gives it
away. Each gets its exact finding (code, seq and reason), fast path and full checks
alike; docs/head-node.md lists the codes."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.ledger import Ledger, hmac_epochs
from spark_slurm.ledger.chain import link_hash
from spark_slurm.ledger.keys import load_signing_key
from spark_slurm.ledger.records import envelope_bytes
from tests.unit.head import tamper
from tests.unit.head.builders import k0
from tests.unit.head.conftest import Cluster
from tests.unit.head.test_merge_findings import findings

Row = list[Any]
COLUMNS = "seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id"


def forged(c: Cluster, seq: int, like: Row, prev: bytes, body: dict[str, Any]) -> Row:
    """A record at `seq` with `body`, linked to `prev`, MAC'd with `like`'s epoch key."""
    stored = envelope_bytes(seq, like[1], like[2], body)
    h = link_hash(prev, stored)
    parsed = hmac_epochs.parse_key_id(str(like[8]))
    assert parsed is not None
    mac = hmac_epochs.mac(hmac_epochs.EpochKeys(k0(c)).key(parsed[1]), h)
    return [seq, like[1], like[2], like[3], stored, prev, h, mac, like[8]]


def replace_rows(path: Path, rows: list[Row], *, primary_key: bool = True) -> None:
    """Write `rows` as the whole `per` table (optionally rebuilt without its PRIMARY KEY,
    which SQLite lets anyone holding the file do)."""
    with closing(sqlite3.connect(path)) as conn, conn:
        if primary_key:
            conn.execute("DELETE FROM per")
        else:
            conn.execute("DROP TABLE per")
            conn.execute("CREATE TABLE per (seq INTEGER, time_ns INTEGER, kind TEXT, "
                         "job_id TEXT, body BLOB, prev_hash BLOB, hash BLOB, mac BLOB, "
                         "key_id TEXT)")
        conn.executemany(f"INSERT INTO per ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                         [tuple(r) for r in rows])


def body_of(row: Row) -> dict[str, Any]:
    body = json.loads(row[4])["body"]
    assert isinstance(body, dict)
    return body


def both(c: Cluster) -> list[tuple[str, str, int | None, str]]:
    fast = findings(c, fast=True)
    assert findings(c, fast=False) == fast
    return fast


def test_a_record_inserted_with_the_later_ones_renumbered_is_named_at_its_seq(
        cluster: Cluster) -> None:
    """A new record 4 chained on record 3; the old 4.. moved up one seq, unchanged."""
    rows = tamper.rows(cluster.n1)
    new = forged(cluster, 4, rows[4], rows[3][6], dict(body_of(rows[4]), extra=1))
    later = [[r[0] + 1, *r[1:]] for r in rows[4:]]
    replace_rows(cluster.n1, [*rows[:4], new, *later])
    assert both(cluster) == [
        ("TAMPERED", "n1", 4, "a record was inserted at seq 4 (later records renumbered)")]


def test_another_nodes_record_in_place_of_one_is_named_by_the_seq_it_holds(
        cluster: Cluster) -> None:
    """Record 4 replaced by n2's record 9 as stored (its own hash, its own link)."""
    rows, theirs = tamper.rows(cluster.n1), tamper.rows(cluster.n2)
    rows[4] = [4, *theirs[9][1:]]
    replace_rows(cluster.n1, rows)
    assert both(cluster) == [("REORDER", "n1", 4, "holds the record of seq 9")]


def test_a_record_linked_past_its_predecessor_names_the_seq_it_links_to(
        cluster: Cluster) -> None:
    """Record 5 rewritten to chain on record 3 (record 4 skipped, still stored)."""
    rows = tamper.rows(cluster.n1)
    rows[5] = forged(cluster, 5, rows[5], rows[3][6], body_of(rows[5]))
    replace_rows(cluster.n1, rows)
    assert both(cluster) == [("REORDER", "n1", 5, "links to seq 3, not to seq 4")]


def test_a_second_record_under_one_seq_is_a_reorder(cluster: Cluster) -> None:
    """`per` rebuilt without its PRIMARY KEY: record 4 stored twice."""
    rows = tamper.rows(cluster.n1)
    replace_rows(cluster.n1, [*rows[:5], rows[4], *rows[5:]], primary_key=False)
    assert both(cluster) == [("REORDER", "n1", 4, "seq 4 appears after seq 4")]


def test_the_first_record_after_genesis_naming_another_node_is_foreign(
        cluster: Cluster) -> None:
    """Record 1 (the first that must name the node) names n9, chain and MACs rebuilt."""
    rows = tamper.rows(cluster.n1)
    env = json.loads(rows[1][4])
    env["body"]["node"] = "n9"
    rows[1][4] = json.dumps(env).encode()
    tamper.rewrite(cluster.n1, rows, k0(cluster))
    assert both(cluster) == [("FOREIGN_ORIGIN", "n1", 1, "record names node 'n9'")]


def test_an_endorsed_rotation_with_a_bad_mac_is_still_tampered(cluster: Cluster) -> None:
    """The rotation is genuine; its MAC is not. Following the rotation must not make
    the record acceptable (nor the checkpoint the new key signed at the rotation
    verifiable)."""
    keys = cluster.root / "keys-n1"
    with Ledger.open(cluster.n1, k0(cluster), load_signing_key(keys / "node.key"), node="n1",
                     clock=cluster.clock) as led:
        seq = led.rotate_signing_key(Ed25519PrivateKey.generate()).seq
    tamper.sql(cluster.n1, "UPDATE per SET mac = zeroblob(32) WHERE seq = ?", (seq,))
    assert both(cluster) == [
        ("TAMPERED", "n1", seq, "MAC does not verify with the epoch 0 key"),
        ("UNKNOWN_KEY", "n1", None,
         f"checkpoint of spark/spark/n1 size {seq + 1} is not signed by the given key")]


def test_a_seal_removed_after_a_record_the_fast_path_took_is_an_epoch_gap(
        cluster: Cluster) -> None:
    """The record before the new epoch is an ordinary one naming the node (taken by the
    fast path, as SQLite hands it over: a plain tuple); the seal between is removed and
    the chain rebuilt."""
    keys = cluster.root / "keys-n1"
    with Ledger.open(cluster.n1, k0(cluster), load_signing_key(keys / "node.key"), node="n1",
                     clock=cluster.clock) as led:
        led.append("fault", {"v": 1, "node": "n1", "gpu": 0, "error": "x"})
        cluster.clock.advance(3600)
        led.append("fault", {"v": 1, "node": "n1", "gpu": 1, "error": "y"})
    rows = tamper.rows(cluster.n1)
    assert rows[-2][2] == "key" and rows[-3][2] == "fault"
    del rows[-2]
    tamper.rewrite(cluster.n1, rows, k0(cluster))
    assert both(cluster) == [
        ("EPOCH_GAP", "n1", len(rows) - 1, "epoch 0 ends without its seal record")]


def test_a_record_stored_before_its_predecessor_under_one_seq_is_a_reorder(
        cluster: Cluster) -> None:
    """`per` rebuilt without its PRIMARY KEY: record 5 stored under seq 4, ahead of
    record 4 (also under seq 4)."""
    rows = tamper.rows(cluster.n1)
    replace_rows(cluster.n1, [*rows[:4], [4, *rows[5][1:]], rows[4], *rows[6:]],
                 primary_key=False)
    assert both(cluster) == [
        ("REORDER", "n1", 4, "holds the record of seq 5, which links to a record stored "
         "after it")]
