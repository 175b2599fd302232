"""proto/generate.py as a module (it is a script beside the package, not part of it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[1] / "proto" / "generate.py"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proto_generate", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
