"""`sparkctl files install`: write every admin file where it belongs, and say what happened.

Files are written under `root` (default `/`; another directory stages a tree to
review or package) at the paths of the catalogue, with their contents referring
to the final paths (`Layout`), never to `root`: like DESTDIR. Each write is atomic
(a reader never sees half a unit or a half-written wrapper). Configs the admin
edits are never replaced once there unless `force`; everything else is the
package's and is brought up to date (the report says `unchanged` when it already
was), so running it again after an upgrade is safe. The Lua policy table is
compiled from the site policy at `/etc/spark/policy.yaml` under `root` (the
example, when no site policy exists yet) or from `policy`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from spark_slurm.durable import replace_file
from spark_slurm.errors import InputError
from spark_slurm.files.layout import Layout, render
from spark_slurm.files.shipped import CATALOGUE, Entry, catalogue, data_root, source_path

Action = Literal["created", "updated", "unchanged", "kept"]


@dataclass(frozen=True, slots=True)
class Written:
    """What happened to one file (or would, in a dry run)."""

    path: Path  # where it was written (under root)
    target: Path  # the path the installed host sees
    action: Action
    mode: int
    kind: str
    hosts: str
    purpose: str
    source: str | None

    def to_json(self) -> dict[str, object]:
        return {"path": str(self.path), "target": str(self.target), "action": self.action,
                "mode": f"{self.mode:04o}", "kind": self.kind, "hosts": self.hosts,
                "purpose": self.purpose, "source": self.source}


def _hook_config() -> bytes:
    from spark_slurm.hook import DEFAULTS  # noqa: PLC0415 (stdlib-only module)

    return (json.dumps(DEFAULTS, indent=2, sort_keys=True) + "\n").encode()


def _policy_lua(policy: tuple[Path, str]) -> bytes:
    """The compiled table; errors name the file read, the header the file installed."""
    from spark_slurm.policy import Policy  # noqa: PLC0415 (only this entry needs it)
    from spark_slurm.policy.lua import compile_lua  # noqa: PLC0415

    path, shown = policy
    loaded = Policy.load(path)
    return compile_lua(Policy(loaded.data, loaded.text, loaded.sha256, shown)).encode("ascii")


def _contents(entry: Entry, layout: Layout, data: Path, policy: tuple[Path, str]) -> bytes:
    if entry.kind == "hook-config":
        return _hook_config()
    if entry.kind == "policy-lua":
        return _policy_lua(policy)
    src = source_path(entry, data)
    if entry.kind == "template":
        return render(src.read_text(encoding="utf-8"), layout.values(),
                      entry.source or entry.target).encode("utf-8")
    return src.read_bytes()


def _under(root: Path, target: Path) -> Path:
    return root / target.relative_to("/")


def plan(layout: Layout, root: Path = Path("/"),
         data: Path | None = None) -> list[tuple[Entry, Path, Path]]:
    """(entry, path under root, installed target) for every catalogue entry."""
    out = []
    for entry in catalogue(data):
        target = layout.target(entry.target)
        out.append((entry, _under(root, target), target))
    return out


def install(layout: Layout, root: Path = Path("/"), *, policy: Path | None = None,
            force: bool = False, dry_run: bool = False) -> list[Written]:
    """Write (or with `dry_run`, only decide) every file; returns one line per file.

    Every file's contents are made before the first is written, so a site policy
    that does not compile (or a template that does not render) leaves the tree as
    it was.
    """
    data = data_root()
    root = root.resolve()
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    chosen = (policy, str(policy)) if policy is not None else policy_source(layout, root, data)
    todo: list[tuple[Written, bytes | None]] = []
    for entry, path, target in plan(layout, root, data):
        exists = path.is_file()
        contents: bytes | None = None
        if entry.kind in ("config", "hook-config") and exists and not force:
            action: Action = "kept"
        else:
            contents = _contents(entry, layout, data, chosen)
            same = exists and path.read_bytes() == contents and \
                (path.stat().st_mode & 0o7777) == entry.mode
            action = "unchanged" if same else ("updated" if exists else "created")
        todo.append((Written(path, target, action, entry.mode, entry.kind, entry.hosts,
                             entry.purpose, entry.source), contents))
    if not dry_run:
        for w, contents in todo:
            if w.action in ("created", "updated") and contents is not None:
                _write(w.path, contents, w.mode)
    return [w for w, _ in todo]


def _write(path: Path, contents: bytes, mode: int) -> None:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        replace_file(path, contents, mode)
    except OSError as exc:
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None


def policy_source(layout: Layout, root: Path, data: Path) -> tuple[Path, str]:
    """The policy to compile and the name it goes by on the host: the site policy
    under root, or the shipped example when there is none yet (the same bytes this
    run installs as the site policy)."""
    example = next(e for e in CATALOGUE if e.source == "etc/policy.yaml")
    target = layout.target(example.target)
    site = _under(root, target)
    return (site if site.is_file() else source_path(example, data)), str(target)
