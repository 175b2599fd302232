"""Where the admin files that ship with spark-slurm live, and where each one is installed.

In git the files stay where admins and the docs look for them (`slurm/`,
`contrib/`, `etc/`, `docs/`, `proto/`); a wheel carries the same trees, paths
unchanged, under `spark_slurm/_data/` (setup.py copies them at build time). So
`data_root()` is the installed copy when there is one, else the checkout this
package was imported from (an editable install or `make venv`), and one table,
`CATALOGUE`, names every file either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from spark_slurm.errors import InputError

# copy: written as shipped; template: @PLACEHOLDER@s filled for this installation;
# config: an example the admin edits, never overwritten once there (without --force);
# hook-config: hook.json made from the hook's own defaults (kept like a config);
# policy-lua: the site policy compiled for job_submit.lua (rewritten every time).
Kind = Literal["copy", "template", "config", "hook-config", "policy-lua"]
KINDS: tuple[Kind, ...] = ("copy", "template", "config", "hook-config", "policy-lua")

_MARKER = Path("slurm") / "job_submit.lua"


@dataclass(frozen=True, slots=True)
class Entry:
    """One installed file: its source under the data root (None: generated), its
    target (with {share}, {doc}, {libexec} for the prefix's directories), its mode,
    which hosts need it, and what it is for."""

    source: str | None
    target: str
    mode: int
    kind: Kind
    hosts: str
    purpose: str


def _units() -> list[Entry]:
    out = [Entry("contrib/sparkd.service", "etc/systemd/system/sparkd.service", 0o644,
                 "template", "controller, nodes", "the node daemon's systemd unit"),
           Entry("contrib/karman-exporter.service", "etc/systemd/system/karman-exporter.service",
                 0o644, "template", "monitoring", "the Karman exporter's systemd unit")]
    for name, what in (("spark-merge", "nightly merge of every node ledger"),
                       ("spark-checkpoint", "checkpoint witness every 15 minutes")):
        out += [Entry(f"contrib/{name}.service", f"etc/systemd/system/{name}.service", 0o644,
                      "template", "head", what),
                Entry(f"contrib/{name}.timer", f"etc/systemd/system/{name}.timer", 0o644,
                      "copy", "head", f"timer of {name}.service")]
    return out


CATALOGUE: tuple[Entry, ...] = (
    Entry("slurm/job_submit.lua", "etc/slurm/job_submit.lua", 0o644, "copy", "controller",
          "submit plugin (JobSubmitPlugins=lua), beside slurm.conf"),
    Entry(None, "etc/slurm/spark_policy.lua", 0o644, "policy-lua", "controller",
          "the site policy compiled for job_submit.lua"),
    Entry("slurm/prolog", "etc/slurm/spark-prolog", 0o755, "template", "nodes",
          "Prolog= wrapper running spark-hook"),
    Entry("slurm/epilog", "etc/slurm/spark-epilog", 0o755, "template", "nodes",
          "Epilog= wrapper running spark-hook"),
    Entry("slurm/spark-nhc-check", "etc/slurm/spark-nhc-check", 0o755, "template", "nodes",
          "HealthCheckProgram= (drains a node whose sparkd does not answer)"),
    Entry("slurm/slurm.conf.snippet", "{share}/slurm/slurm.conf.snippet", 0o644, "copy",
          "all", "lines to add to slurm.conf"),
    Entry("slurm/gres.conf.snippet", "{share}/slurm/gres.conf.snippet", 0o644, "copy",
          "nodes", "lines to add to gres.conf"),
    Entry("etc/sparkd.yaml", "etc/spark/sparkd.yaml", 0o644, "config", "controller, nodes",
          "sparkd configuration (commented example: edit node, gpu, karman, metrics)"),
    Entry("etc/policy.yaml", "etc/spark/policy.yaml", 0o644, "config", "all",
          "site power policy (commented example)"),
    Entry("etc/karman.yaml", "etc/spark/karman.yaml", 0o644, "config", "monitoring",
          "Karman exporter/recorder/tail configuration: live device or replay (commented)"),
    Entry(None, "etc/spark/hook.json", 0o644, "hook-config", "nodes",
          "spark-hook configuration (the hook's defaults)"),
    *_units(),
    Entry("contrib/collect-ledgers.sh", "{libexec}/collect-ledgers.sh", 0o755, "copy", "head",
          "collects node ledgers for the merge and witness units"),
    Entry("contrib/verify-ledger.sh", "{libexec}/verify-ledger.sh", 0o755, "copy", "any",
          "independent ledger verifier (sqlite3, sha256sum, openssl only)"),
    Entry("contrib/verify-evidence.sh", "{libexec}/verify-evidence.sh", 0o755, "copy", "any",
          "independent evidence-bundle verifier (sqlite3, sha256sum, openssl only)"),
    Entry("contrib/prometheus/demo-prometheus.yml", "{share}/prometheus/demo-prometheus.yml",
          0o644, "copy", "monitoring", "Prometheus scrape config (sparkd and exporter)"),
    Entry("contrib/prometheus/karman-scrape.yml", "{share}/prometheus/karman-scrape.yml",
          0o644, "copy", "monitoring", "Prometheus scrape job for the Karman exporter"),
    Entry("contrib/prometheus/spark-rules.yml", "{share}/prometheus/spark-rules.yml", 0o644,
          "copy", "monitoring", "Prometheus alert rules for sparkd and Karman"),
    Entry("contrib/prometheus/spark-rules.test.yml", "{share}/prometheus/spark-rules.test.yml",
          0o644, "copy", "monitoring", "promtool unit tests of the alert rules"),
    Entry("proto/karman.proto", "{share}/proto/karman.proto", 0o644, "copy", "any",
          "the Karman wire schema"),
)

# Whole directories shipped file by file, so a new dashboard or page needs no entry.
GLOBS = (("contrib/grafana", "*.json", "{share}/grafana", "monitoring",
          "Grafana dashboard (import it, pick the Prometheus data source)"),
         ("docs", "*.md", "{doc}", "any", "documentation"))


def catalogue(root: Path | None = None) -> tuple[Entry, ...]:
    """Every installed file, in install order: the table, then the globbed directories."""
    base = root or data_root()
    found = [Entry(f"{where}/{path.name}", f"{target}/{path.name}", 0o644, "copy", hosts, what)
             for where, pattern, target, hosts, what in GLOBS
             for path in sorted((base / where).glob(pattern))]
    return CATALOGUE + tuple(found)


def data_root() -> Path:
    """The directory holding slurm/, contrib/, etc/, docs/ and proto/ as shipped."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_data", package.parent):
        if (candidate / _MARKER).is_file() and (candidate / "contrib").is_dir():
            return candidate
    raise InputError(f"{package}: this spark-slurm installation has no admin files "
                     "(neither a wheel's spark_slurm/_data nor a source checkout)")


def source_path(entry: Entry, root: Path | None = None) -> Path:
    """The shipped file behind an entry (generated entries have none)."""
    if entry.source is None:
        raise InputError(f"{entry.target}: generated at install time, not shipped")
    path = (root or data_root()) / entry.source
    if not path.is_file():
        raise InputError(f"{path}: shipped file missing from this installation")
    return path
