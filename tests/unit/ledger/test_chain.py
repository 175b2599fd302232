"""`Chain`, the one chain/Merkle implementation: its three ways in (link, accept,
push) agree with RFC 6962 computed from scratch, and accept stops exactly at the
first row that does not continue the chain."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from spark_slurm.ledger.chain import GENESIS_PREV, SUBTREE_LEVEL, Chain, fold, node_hash
from spark_slurm.ledger.merkle import leaf_hash


def mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 2.1, recursively, as the RFC writes it."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def bodies(n: int) -> list[bytes]:
    return [b'{"body":{"i":%d}}' % i for i in range(n)]


def rows(data: list[bytes], start: int = 0, head: bytes = GENESIS_PREV) -> list[tuple[Any, ...]]:
    out, prev = [], head
    for i, body in enumerate(data):
        h = hashlib.sha256(prev + body).digest()
        out.append((start + i, 0, "cap", None, body, prev, h, None, None))
        prev = h
    return out


def expected_subtrees(leaves: list[bytes]) -> set[tuple[int, int, bytes]]:
    out = set()
    level = SUBTREE_LEVEL
    while 1 << level <= len(leaves):
        for idx in range(len(leaves) >> level):
            out.add((level, idx, mth(leaves[idx << level:(idx + 1) << level])))
        level += 1
    return out


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 255, 256, 257, 600, 1024, 1100])
def test_link_accept_and_push_give_the_rfc_6962_tree(n: int) -> None:
    data = bodies(n)
    leaves = [leaf_hash(b) for b in data]
    written, checked, grafted = Chain(), Chain(), Chain()
    for c in (written, checked, grafted):
        c.subtrees = []
    hashes = written.link(data)
    assert hashes == [r[6] for r in rows(data)]
    assert checked.accept(rows(data)) == n
    for leaf in leaves:
        grafted.push(leaf)
    for c in (written, checked, grafted):
        assert c.size == n
        assert c.root() == mth(leaves)
        assert set(c.subtrees or []) == expected_subtrees(leaves)
    assert written.head == checked.head == (hashes[-1] if n else GENESIS_PREV)
    assert written.to_bytes() == checked.to_bytes() == grafted.to_bytes()


def test_a_chain_resumes_from_its_saved_state() -> None:
    data = bodies(700)
    first = Chain()
    first.link(data[:333])
    again = Chain.from_bytes(first.size, first.to_bytes(), first.head)
    assert again.accept(rows(data[333:], 333, first.head)) == 367
    whole = Chain()
    whole.link(data)
    assert (again.size, again.head, again.root()) == (whole.size, whole.head, whole.root())
    with pytest.raises(ValueError, match="needs 2 hashes"):
        Chain(3, [bytes(32)])
    with pytest.raises(ValueError, match="32-byte hashes"):
        Chain.from_bytes(1, bytes(31))


def test_detached_chunks_graft_into_the_whole_tree() -> None:
    data = bodies(3 * 512 + 77)
    leaves = [leaf_hash(b) for b in data]
    whole = Chain()
    whole.subtrees = []
    whole.accept(rows(data))
    combined = Chain()
    combined.subtrees = []
    found = []
    all_rows = rows(data)
    for lo in range(0, len(data), 512):
        part = all_rows[lo:lo + 512]
        chunk = Chain(lo, (), part[0][5], base=lo)
        chunk.subtrees = []
        assert chunk.accept(part) == len(part)
        found += chunk.subtrees
        for h, level in zip(chunk.hashes, chunk.levels(), strict=True):
            combined.push(h, level)
    found += combined.subtrees
    assert combined.root() == whole.root() == mth(leaves)
    assert sorted(found) == sorted(whole.subtrees or []) == sorted(expected_subtrees(leaves))
    with pytest.raises(ValueError, match="cannot follow"):
        combined.push(bytes(32), 3)


def test_marks_keep_the_compact_range_at_those_sizes() -> None:
    data = bodies(40)
    chain = Chain()
    chain.marks = frozenset({1, 17, 40})
    chain.accept(rows(data))
    leaves = [leaf_hash(b) for b in data]
    for size in (1, 17, 40):
        hashes, head = chain.marked[size]
        assert fold(hashes) == mth(leaves[:size])
        assert head == rows(data)[size - 1][6]


def _edit(table: list[tuple[Any, ...]], i: int, col: int, value: object) -> list[tuple[Any, ...]]:
    out = list(table)
    row = list(out[i])
    row[col] = value
    out[i] = tuple(row)
    return out


@pytest.mark.parametrize(("col", "value"), [
    (0, 6),  # seq: a gap
    (5, bytes(32)),  # prev hash column alone (its hash still H(true head ‖ body))
    (6, bytes(32)),  # the hash
    (4, b'{"body":{"i":99}}'),  # the body, hash left alone
    (4, '{"body":{"i":5}}'),  # the body as TEXT: not bytes, not a continuation
])
def test_accept_stops_before_the_first_row_that_does_not_continue(col: int,
                                                                  value: object) -> None:
    good = rows(bodies(10))
    bad = _edit(good, 5, col, value)
    chain = Chain()
    assert chain.accept(bad) == 5
    ref = Chain()
    ref.accept(good[:5])
    assert (chain.size, chain.head, chain.hashes) == (ref.size, ref.head, ref.hashes)


def test_accept_refuses_a_row_linked_to_a_rewritten_predecessor() -> None:
    """Row 2 rewritten with its own hash recomputed: row 3 still links to the old one."""
    good = rows(bodies(6))
    body2 = b'{"body":{"i":222}}'
    new2 = hashlib.sha256(good[1][6] + body2).digest()
    forged = _edit(_edit(good, 2, 4, body2), 2, 6, new2)
    chain = Chain()
    assert chain.accept(forged) == 3
    assert chain.head == new2


@pytest.mark.parametrize("cuts", [[1100], [1, 2, 3, 1094], [255, 1, 512, 332], [700, 400],
                                  [4096 + 3, 5000 - 4099]])
def test_leaves_added_in_any_batches_keep_roots_and_heads_at_the_marks(cuts: list[int]) -> None:
    """How merge grows a node's stored range: leaf and record hashes a page at a time,
    resumed from the stored bytes between merges, checkpoint sizes as marks."""
    data = bodies(sum(cuts))
    table = rows(data)
    leaves = [leaf_hash(b) for b in data]
    marks = frozenset({1, 2, 3, 7, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 1099,
                       sum(cuts)})
    chain, at, found = Chain(), 0, []
    for cut in cuts:
        chain = Chain.from_bytes(at, chain.to_bytes(), chain.head)  # as the store keeps it
        chain.marks, chain.subtrees = marks, []
        chain.add_leaves(leaves[at:at + cut], [r[6] for r in table[at:at + cut]])
        found += chain.subtrees
        at += cut
        assert (chain.size, chain.head, chain.root()) == (at, table[at - 1][6], mth(leaves[:at]))
        for size in marks:
            if at - cut < size <= at:
                assert chain.root_at(size) == mth(leaves[:size]), size
                assert chain.head_at(size) == table[size - 1][6], size
            else:
                assert chain.root_at(size) is None and chain.head_at(size) is None
    assert sorted(found) == sorted(expected_subtrees(leaves))


def test_leaves_without_record_hashes_move_no_head_and_pass_no_mark() -> None:
    leaves = [leaf_hash(b) for b in bodies(600)]
    chain = Chain()
    chain.add_leaves(leaves)
    assert (chain.size, chain.head, chain.root()) == (600, GENESIS_PREV, mth(leaves))
    chain.marks = frozenset({700})
    with pytest.raises(ValueError, match=r"^a mark's head is unknown without the records' "
                                         r"hashes$"):
        chain.add_leaves(leaves[:100])
    with pytest.raises(ValueError, match="3 leaves but 2 record hashes"):
        chain.add_leaves(leaves[:3], [bytes(32)] * 2)
    assert chain.size == 600
    chain.marks = frozenset({600})  # a mark already passed (at the chain's size) is no bar
    chain.add_leaves(leaves[:100])
    assert (chain.size, chain.root()) == (700, mth(leaves + leaves[:100]))


def test_a_copy_of_a_worker_chain_keeps_its_base() -> None:
    """A verifier worker's chain starts at its chunk (base 8 here): a copy stands at
    the same place and grows the same tree."""
    data = bodies(12)
    chain = Chain(8, (), hashlib.sha256(b"record 7").digest(), base=8)
    assert chain.accept(rows(data[8:10], 8, chain.head)) == 2
    twin = chain.copy()
    assert (twin.base, twin.size, twin.head, twin.levels()) == (8, 10, chain.head, [1])
    assert twin.accept(rows(data[10:12], 10, twin.head)) == 2
    assert twin.root() == mth([leaf_hash(b) for b in data[8:12]])


def test_a_compact_range_of_the_wrong_length_is_refused_by_its_own_leaves() -> None:
    """A worker's chain counts leaves from its base: 2 leaves past base 8 need one hash."""
    with pytest.raises(ValueError, match=r"^a compact range of 2 leaves needs 1 hashes, not 0$"):
        Chain(10, (), base=8)
    assert Chain(10, [bytes(32)], base=8).levels() == [1]
