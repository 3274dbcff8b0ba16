"""The protocol core is pure: it pulls in no I/O, clock, logging or randomness."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import relate_smtp.protocol

FORBIDDEN_MODULES = ("socket", "ssl", "trio", "asyncio", "selectors", "logging", "random", "time")
PACKAGE = pathlib.Path(relate_smtp.protocol.__file__).parent


def test_importing_the_core_loads_no_io_modules() -> None:
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import relate_smtp.protocol\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent.parent,
    ).stdout
    loaded = json.loads(out)
    assert "relate_smtp.protocol" in loaded
    for name in FORBIDDEN_MODULES:
        assert name not in loaded, f"relate_smtp.protocol imports {name}"
        assert not any(m.startswith(name + ".") for m in loaded), name


def test_sources_import_nothing_forbidden() -> None:
    pattern = re.compile(
        r"^\s*(?:import|from)\s+(" + "|".join(FORBIDDEN_MODULES) + r")\b", re.MULTILINE
    )
    sources = sorted(PACKAGE.glob("*.py"))
    assert len(sources) >= 9
    for source in sources:
        assert not pattern.search(source.read_text()), source.name
