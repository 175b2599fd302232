"""A local user hogging sparkd's socket: the load of issue 19, for the benchmark and tests.

The hog runs as an unprivileged uid in its own process (stdlib only, like any
user's script): it keeps up to N connections open, reconnecting whatever the
daemon closes or turns away, for S seconds, then prints what it saw as JSON.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HOG = r"""
import json, resource, socket, sys, time
path, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks, seen = [], {"opened": 0, "busy": 0, "refused": 0, "closed": 0}
end = time.monotonic() + secs
while time.monotonic() < end:
    while len(socks) < n:
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
        except OSError:
            s.close()
            seen["refused"] += 1
            break
        socks.append(s)
        seen["opened"] += 1
    keep = []
    for s in socks:
        try:
            data = s.recv(4096)
        except BlockingIOError:
            keep.append(s)
            continue
        except OSError:
            data = b""
        seen["busy" if b'"busy"' in data else "closed"] += 1
        s.close()
    socks = keep
    time.sleep(0.01)
seen["held_at_end"] = len(socks)
print(json.dumps(seen))
"""


def start_hog(socket_path: Path, uid: int, connections: int = 1000,
              seconds: float = 60.0) -> subprocess.Popen[str]:
    """Start the hog as `uid` (setpriv; needs root) against `socket_path`."""
    return subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable,
         "-I", "-S", "-c", HOG, str(socket_path), str(connections), str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
