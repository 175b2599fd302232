"""Karman facility power stream: schema, subscriber, window stats, replay and tools.

The names below are the package's contract with the daemon (docs/architecture.md).
Nothing here imports ZeroMQ or protobuf until a stream is actually used.
"""

from spark_slurm.karman.ring import FacilityWindow
from spark_slurm.karman.subscriber import KarmanSubscriber

__all__ = ["FacilityWindow", "KarmanSubscriber"]
