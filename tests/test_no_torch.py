"""`genspec validate`, `show` and `graph` never import torch (nor torchvision)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spec_helpers import REPO

PROBE = """
import sys
from genspec.cli import main
rc = main({argv!r})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
print("RC", rc)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("argv", [
    ["validate", "specs/quickstart.yaml"],
    ["validate", "specs/quickstart.yaml", "--set", "train.epochs=0"],  # the error path too
    ["show", "specs/quickstart.yaml"],
    ["show", "--json", "specs/quickstart.yaml"],
    ["graph", "specs/quickstart.yaml"],
    ["graph", "--format", "dot", "specs/quickstart.yaml"],
    ["graph", "--format", "json", "specs/quickstart.yaml"],
], ids=lambda a: " ".join(a))
def test_command_does_not_import_torch(argv):
    result = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-2] == ("RC 2" if "--set" in argv else "RC 0"), result.stdout + result.stderr
    assert lines[-1] == "HEAVY []"


def test_importing_genspec_and_loading_a_spec_does_not_import_torch():
    code = ("import sys, genspec; spec = genspec.load('specs/quickstart.yaml'); "
            "print(spec.name, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout == "quickstart False\n", result.stderr


def test_graph_png_does_not_import_torch(tmp_path):
    out = tmp_path / "g.png"
    argv = ["graph", "--format", "png", "--out", str(out), "specs/quickstart.yaml"]
    result = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.splitlines()[-2:] == ["RC 0", "HEAVY []"], result.stdout + result.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
