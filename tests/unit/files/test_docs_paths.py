"""The install paths the docs give, the paths the units and Slurm snippets name, and
the files `sparkctl files install` writes are one set: a change to any of them that
leaves the others behind fails here."""

from __future__ import annotations

import re
from pathlib import Path

from spark_slurm.files import Layout, install

REPO = Path(__file__).resolve().parents[3]
VENV = Path("/opt/spark")  # the documented install location (docs/slurm-setup.md)


def _documented_layout() -> Layout:
    return Layout(bindir=VENV / "bin", python=VENV / "bin" / "python",
                  pkgdir=VENV / "lib" / "python3.11" / "site-packages")


def _expand(path: str) -> list[str]:
    """`/a/{b,c}/` -> ['/a/b/', '/a/c/'] (the docs' shorthand)."""
    found = re.search(r"\{([^}]*)\}", path)
    if found is None:
        return [path]
    return [p for alt in found.group(1).split(",")
            for p in _expand(path[:found.start()] + alt + path[found.end():])]


def test_paths_in_the_install_table_are_what_gets_written(tmp_path: Path) -> None:
    written = {str(w.target) for w in install(_documented_layout(), tmp_path)}
    text = (REPO / "docs" / "slurm-setup.md").read_text()
    table = text[text.index("## What runs where"):text.index("## 1. Install")]
    named = [p for cell in re.findall(r"`(/[^`]+)`", table) for p in _expand(cell)]
    assert len(named) > 10
    for path in named:
        if path.endswith("/"):
            assert any(w.startswith(path) for w in written), path
        else:
            assert path in written, path


def test_slurm_snippet_and_units_name_installed_files(tmp_path: Path) -> None:
    done = install(_documented_layout(), tmp_path)
    written = {str(w.target) for w in done}
    snippet = (REPO / "slurm" / "slurm.conf.snippet").read_text()
    for key in ("Prolog", "Epilog", "HealthCheckProgram"):
        found = re.search(rf"^{key}=(\S+)$", snippet, re.MULTILINE)
        assert found is not None and found.group(1) in written, key
    units = tmp_path / "etc" / "systemd" / "system"
    for unit in units.glob("*.service"):
        for line in unit.read_text().splitlines():
            for key in ("ExecStart", "Documentation"):
                if line.startswith(f"{key}="):
                    path = line.split("=", 1)[1].split()[0].removeprefix("file://")
                    assert path in written or path in (str(VENV / "bin" / "sparkd"),
                                                       str(VENV / "bin" / "sparkctl")), line
    sparkd = (units / "sparkd.service").read_text()
    assert "ExecStart=/opt/spark/bin/sparkd --config /etc/spark/sparkd.yaml" in sparkd
    assert "/etc/spark/sparkd.yaml" in written
    merge = (units / "spark-merge.service").read_text()
    assert "Environment=SPARKCTL=/opt/spark/bin/sparkctl" in merge
    docs = (REPO / "docs" / "slurm-setup.md").read_text()
    assert "python3 -m venv /opt/spark" in docs and "`SPARKCTL=/opt/spark/bin/sparkctl`" in docs
