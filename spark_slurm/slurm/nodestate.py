"""A node's drain state and reason as slurmctld has them, and resuming it.

`scontrol show node -o NODE` prints `State=IDLE+DRAIN ... Reason=TEXT [user@time]`
(Reason last, its time in the controller's local time). Every command goes
through the injected Runner.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from spark_slurm.errors import SlurmParseError
from spark_slurm.slurm.runner import Runner, check

_REASON_STAMP = re.compile(r"^(?P<text>.*?)\s*\[(?P<user>[^@\]]*)@(?P<when>[0-9T:\-]+)\]$")


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What the controller says about one node."""

    name: str
    state: str
    reason: str = ""
    reason_user: str = ""
    reason_time_s: float | None = None

    @property
    def drained(self) -> bool:
        """Drained or draining: the DRAIN flag, whatever the base state."""
        return "DRAIN" in self.state.upper().split("+")


def parse_node(text: str, name: str) -> NodeStatus:
    """One `scontrol show node -o` line as a NodeStatus."""
    line = next((ln for ln in text.splitlines() if ln.startswith(f"NodeName={name} ")), "")
    if not line:
        raise SlurmParseError("scontrol show node output", text, f"no NodeName={name} line")
    state = ""
    for token in line.split():
        if token.startswith("State="):
            state = token.split("=", 1)[1]
            break
    reason, user, when = "", "", None
    if " Reason=" in line:
        raw = line.split(" Reason=", 1)[1].strip()
        stamp = _REASON_STAMP.match(raw)
        if stamp:
            reason, user = stamp["text"], stamp["user"]
            try:
                when = time.mktime(time.strptime(stamp["when"], "%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                when = None
        else:
            reason = raw
    return NodeStatus(name, state, reason, user, when)


def node_status(runner: Runner, name: str) -> NodeStatus:
    res = check(runner.run(["scontrol", "show", "node", "-o", name]))
    return parse_node(res.stdout, name)


def resume(runner: Runner, name: str) -> None:
    """Give a drained node back to the scheduler."""
    check(runner.run(["scontrol", "update", f"nodename={name}", "state=resume"]))
