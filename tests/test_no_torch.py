"""`genspec validate`, `show` and `graph` never import torch (nor torchvision)."""

from __future__ import annotations

import os
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


def test_a_spec_without_plugins_stays_torch_free_with_a_plugin_installed(tmp_path):
    """Installed plugins (`genspec.plugins` entry points) load only for a spec that names them: a
    spec without `plugins:` validates without importing them, nor the torch they import."""
    (tmp_path / "heavy_plugin.py").write_text("import torch\n")
    info = tmp_path / "heavy_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: heavy-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[genspec.plugins]\nheavy = heavy_plugin\n")
    probe = PROBE.format(argv=["validate", "specs/quickstart.yaml"]) + (
        "print('PLUGIN', 'heavy_plugin' in sys.modules)\n"
        "from importlib.metadata import entry_points\n"
        "print('INSTALLED', [e.name for e in entry_points(group='genspec.plugins')])\n")  # it is there to be loaded
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert result.stdout.splitlines()[-4:] == ["RC 0", "HEAVY []", "PLUGIN False", "INSTALLED ['heavy']"], \
        result.stdout + result.stderr
