"""The pipeline tests' node: a Pipeline over a real ledger and fake GPUs
(test_pipeline_record.Node), stopped and closed after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.daemon.test_pipeline_record import Node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    made = Node(tmp_path)
    yield made
    made.writer.stop()
    made.ledger.close()
