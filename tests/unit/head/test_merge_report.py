"""What merge tells the operator: the `--json` summary a collector parses, the result of
a source refused before any row (which node, which head is still held), a source
without a genesis record, and a signing-key rotation the node's key did not endorse."""

from __future__ import annotations

import base64
import json
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.cli import run
from spark_slurm.head.merge import MergeSummary, merge_ledgers
from spark_slurm.head.store import display_url, open_store
from spark_slurm.ledger import Ledger, verify_ledger
from spark_slurm.ledger.checkpoint import origin_for
from spark_slurm.ledger.keys import load_hmac_key, load_signing_key
from spark_slurm.ledger.segment import export_segment
from spark_slurm.ledger.store import rotation_message
from tests.unit.head import tamper
from tests.unit.head.conftest import Cluster

pytestmark = pytest.mark.both_stores


def merge(c: Cluster, *sources: Path | str) -> MergeSummary:
    return merge_ledgers(c.db, [str(s) for s in sources], keys_dir=c.trust, clock=c.clock)


def held_head(c: Cluster, node: str) -> int | None:
    with closing(open_store(c.db)) as store:
        state = store.node(node)
    return None if state is None else state.head_seq


def test_the_json_summary_names_every_source_and_finding(
        cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    tamper.sql(cluster.n1, "UPDATE per SET body = replace(body, 'alice', 'mallo') WHERE seq=3")
    missing = cluster.root / "missing.db"
    n1_size, n2_size = len(tamper.rows(cluster.n1)), len(tamper.rows(cluster.n2))
    code = run(["merge", "--db", cluster.db, "--keys", str(cluster.trust), "--json",
                str(cluster.n1), str(cluster.n2), str(missing)])
    assert code == 1
    doc = json.loads(capsys.readouterr().out)
    tampered = {"code": "TAMPERED", "node": "n1", "seq": 3,
                "detail": "stored bytes do not hash to the stored hash"}
    assert set(doc) == {"into", "ok", "appended", "findings", "nodes"}
    assert doc["ok"] is False and doc["appended"] == 3 + n2_size
    with closing(open_store(cluster.db)) as store:
        assert doc["into"] == display_url(store.url)
    assert doc["findings"] == [tampered]
    # SQLite's INSERT ... SELECT hands every row to the check; PostgreSQL's COPY feed
    # stops reading at the first refused one
    read = n1_size if cluster.kind == "sqlite" else 4
    assert doc["nodes"][0] == {"source": str(cluster.n1), "node": "n1", "appended": 3,
                               "head_seq": 2, "ok": False, "error": None, "read": read,
                               "findings": [tampered]}
    assert doc["nodes"][1] == {"source": str(cluster.n2), "node": "n2", "appended": n2_size,
                               "head_seq": n2_size - 1, "ok": True, "error": None,
                               "read": n2_size, "findings": []}
    error = doc["nodes"][2]
    assert error["source"] == str(missing) and error["node"] is None
    assert error["ok"] is False and "missing.db" in error["error"]
    assert (error["appended"], error["head_seq"], error["read"], error["findings"]) == \
        (0, None, 0, [])


def test_a_text_column_that_is_not_utf8_stops_the_merge_at_its_row(cluster: Cluster) -> None:
    size = len(tamper.rows(cluster.n1))
    tamper.sql(cluster.n1, "UPDATE per SET job_id = CAST(X'31FF' AS TEXT) WHERE seq=3")
    """SQLite hands the row over as bytes and the check refuses it as such; PostgreSQL's
    feed decodes it as the verifier reads it (U+FFFD), which no longer matches the
    hashed envelope. Either way the row is counted as read and nothing from it on stored."""
    (result,) = merge(cluster, cluster.n1).results
    why = "a text column is not valid UTF-8" if cluster.kind == "sqlite" else \
        "seq/time/kind/job columns differ from the hashed record"
    assert [(f.code, f.node, f.seq, f.detail) for f in result.findings] == [
        ("TAMPERED", "n1", 3, why)]
    read = size if cluster.kind == "sqlite" else 4
    assert (result.appended, result.head_seq, result.read) == (3, 2, read)


def test_a_file_of_another_node_leaves_the_named_nodes_head_where_it_was(
        cluster: Cluster) -> None:
    assert merge(cluster, cluster.n1).ok
    held = held_head(cluster, "n1")
    assert held is not None
    summary = merge(cluster, f"n1={cluster.n2}")
    (result,) = summary.results
    assert (result.source, result.node, result.appended, result.head_seq) == \
        (str(cluster.n2), "n1", 0, held)
    assert [(f.code, f.node, f.seq) for f in result.findings] == [("FOREIGN_ORIGIN", "n1", 0)]
    assert held_head(cluster, "n1") == held


def test_a_refused_source_of_an_unknown_node_has_no_head(cluster: Cluster) -> None:
    (result,) = merge(cluster, f"n9={cluster.n2}").results
    assert (result.source, result.node, result.head_seq) == (str(cluster.n2), "n9", None)


def test_a_ledger_without_its_genesis_record_is_a_gap_at_zero(cluster: Cluster) -> None:
    tamper.sql(cluster.n1, "DELETE FROM per WHERE seq = 0")
    (result,) = merge(cluster, cluster.n1).results
    assert [(f.code, f.node, f.seq, f.detail) for f in result.findings] == [
        ("GAP", "n1", 0, "ledger does not start with its genesis record")]
    assert (result.node, result.appended, result.head_seq) == ("n1", 0, None)
    with closing(open_store(cluster.db)) as store:
        assert [(f.code, f.node, f.seq) for f in store.findings("n1")] == [("GAP", "n1", 0)]


def test_a_ledger_of_a_held_node_without_genesis_is_still_a_gap(cluster: Cluster) -> None:
    assert merge(cluster, cluster.n1).ok
    held = held_head(cluster, "n1")
    tamper.sql(cluster.n1, "DELETE FROM per WHERE seq = 0")
    (result,) = merge(cluster, cluster.n1).results
    assert [(f.code, f.seq) for f in result.findings] == [("GAP", 0)]
    assert result.head_seq == held == held_head(cluster, "n1")


def test_a_segment_without_genesis_of_an_unknown_node_asks_for_a_full_export(
        cluster: Cluster) -> None:
    seg = export_segment(cluster.n1, cluster.root / "n1.seg", 3)
    tamper.sql(Path(seg.path), "DROP TABLE genesis")
    (result,) = merge(cluster, f"n1={seg.path}").results
    assert [(f.code, f.node, f.seq, f.detail) for f in result.findings] == [
        ("GAP", "n1", 0, "the head node holds nothing of node 'n1' and this segment starts "
         "after seq 3: export it from the start (--after -1)")]
    assert result.head_seq is None and held_head(cluster, "n1") is None


def _rotated(c: Cluster, new: Ed25519PrivateKey | None = None) -> int:
    """n1 rotates its signing key (to `new`) and writes on; the rotation record's seq."""
    keys = c.root / "keys-n1"
    with Ledger.open(c.n1, load_hmac_key(keys / "hmac.key"), load_signing_key(keys / "node.key"),
                     node="n1", clock=c.clock) as led:
        seq = led.rotate_signing_key(new or Ed25519PrivateKey.generate()).seq
        led.append("fault", {"v": 1, "node": "n1", "gpu": 0, "error": "GpuLost"})
    return seq


def _more(c: Cluster, signing: Ed25519PrivateKey | None = None) -> int:
    """Another record and a checkpoint (signed with `signing`); the checkpoint's size."""
    keys = c.root / "keys-n1"
    with Ledger.open(c.n1, load_hmac_key(keys / "hmac.key"),
                     signing or load_signing_key(keys / "node.key"), node="n1",
                     clock=c.clock) as led:
        led.append("fault", {"v": 1, "node": "n1", "gpu": 1, "error": "GpuLost"})
        return led.checkpoint().size


def _ledger_checkpoints(c: Cluster) -> list[int]:
    with closing(open_store(c.db)) as store:
        n1 = store.node("n1")
        assert n1 is not None
        return sorted(cp.size for cp in store.checkpoints(n1.node_id) if cp.source == "ledger")


def _edit_rotation(c: Cluster, seq: int, field: str, value: str) -> None:
    """Rewrite the rotation record's `field`, re-chained and re-MACed (a key thief)."""
    rows = tamper.rows(c.n1)
    env = json.loads(rows[seq][4])
    env["body"][field] = value
    rows[seq][4] = json.dumps(env).encode()
    tamper.rewrite(c.n1, rows, load_hmac_key(c.root / "keys-n1" / "hmac.key"))


def test_a_rotation_endorsed_by_the_nodes_key_is_followed(cluster: Cluster) -> None:
    _rotated(cluster)
    summary = merge(cluster, cluster.n1)
    assert summary.ok and summary.appended == len(tamper.rows(cluster.n1))


def test_a_rotation_merged_earlier_is_followed_by_the_next_merge(cluster: Cluster) -> None:
    """The next night's checkpoint is signed by the rotated key the head node followed."""
    new = Ed25519PrivateKey.generate()
    _rotated(cluster, new)
    assert merge(cluster, cluster.n1).ok
    size = _more(cluster, new)
    summary = merge(cluster, cluster.n1)
    assert summary.ok and summary.appended == 1 and size in _ledger_checkpoints(cluster)


def test_the_keys_followed_so_far_check_a_node_whose_key_left_the_trust_store(
        cluster: Cluster) -> None:
    """Only its HMAC key is trusted now: its checkpoints are checked by the keys held."""
    assert merge(cluster, cluster.n1).ok
    (cluster.trust / "n1.pub").unlink()
    size = _more(cluster)
    summary = merge(cluster, cluster.n1)
    assert summary.ok and summary.appended == 1 and size in _ledger_checkpoints(cluster)


def test_an_incremental_merge_checks_every_new_mac(cluster: Cluster) -> None:
    assert merge(cluster, cluster.n1).ok
    size = _more(cluster)
    tamper.sql(cluster.n1, "UPDATE per SET mac = randomblob(32) WHERE seq = ?", (size - 1,))
    summary = merge(cluster, cluster.n1)
    assert [(f.code, f.seq, f.detail) for f in summary.findings] == [
        ("TAMPERED", size - 1, "MAC does not verify with the epoch 0 key")]
    assert summary.appended == 0


def _endorsed_by(key: Ed25519PrivateKey, body: dict[str, str]) -> str:
    new_raw = base64.b64decode(body["public_key"])
    return base64.b64encode(key.sign(rotation_message(origin_for("spark", "n1"), new_raw))).decode()


@pytest.mark.parametrize("forgery", ["another key", "public key", "endorsement"])
def test_a_rotation_the_current_key_did_not_endorse_is_an_unknown_key(
        cluster: Cluster, forgery: str) -> None:
    """Endorsed by another key, or base64 with a character outside the alphabet (which a
    lenient decoder skips: `sparkctl verify` refuses it, so merge must too)."""
    seq = _rotated(cluster)
    body = json.loads(tamper.rows(cluster.n1)[seq][4])["body"]
    if forgery == "another key":
        _edit_rotation(cluster, seq, "endorsement",
                       _endorsed_by(Ed25519PrivateKey.generate(), body))
    else:
        field = forgery.replace(" ", "_")
        _edit_rotation(cluster, seq, field, body[field][:8] + "*" + body[field][8:])
    summary = merge(cluster, cluster.n1)
    assert [(f.code, f.node, f.seq, f.detail) for f in summary.findings] == [
        ("UNKNOWN_KEY", "n1", seq, "signing key rotation not endorsed by the current key")]
    assert summary.appended == seq and held_head(cluster, "n1") == seq - 1
    report = verify_ledger(cluster.n1, load_hmac_key(cluster.root / "keys-n1" / "hmac.key"))
    assert report.first_bad_seq == seq


@pytest.mark.parametrize("fast", [True, False])
def test_merge_into_sends_every_record_through_the_full_checks_unless_fast(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    """What makes the fast-path comparison (test_merge_source.py) compare anything."""
    from spark_slurm.head import merge as merge_mod  # noqa: PLC0415
    from spark_slurm.head import scan  # noqa: PLC0415
    from spark_slurm.head.keyring import KeyRing  # noqa: PLC0415

    checked: list[int] = []
    real = scan._check

    def spy(rec: Any, *args: Any, **kw: Any) -> Any:
        checked.append(rec.seq)
        return real(rec, *args, **kw)

    monkeypatch.setattr(scan, "_check", spy)
    size = len(tamper.rows(cluster.n1))
    with closing(open_store(cluster.db, create=True)) as store, \
            closing(open_store(cluster.db)) as reads:
        summary = merge_mod.merge_into(store, reads, [str(cluster.n1)],
                                       KeyRing.load(cluster.trust), clock=cluster.clock,
                                       **({} if fast else {"fast": False}))
        assert summary.into == display_url(store.url)
    assert summary.ok and summary.appended == size
    assert (checked == list(range(size))) != fast
