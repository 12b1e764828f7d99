"""The package works installed (not only editable): build a wheel, install it into a
separate folder, and import everything from there in a fresh interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_imports_from_site(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("difftilt-*.whl")
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr
    probe = (
        "import json, difftilt, difftilt.core, difftilt.plugins.toy, difftilt.benchmarks.toy_exactness;"
        "from difftilt.plugins.sequences import TFBind8;"
        "from importlib import resources;"
        "from difftilt.core import list_plugins;"
        "cfg = resources.files('difftilt.plugins.toy') / 'configs' / 'demo.yaml';"
        "print(json.dumps({'file': difftilt.__file__, 'core': difftilt.core.__file__,"
        " 'plugins': [p['name'] for p in list_plugins()], 'config': cfg.is_file(),"
        " 'tfbind8': TFBind8().global_optimum()}))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["file"].startswith(str(target)) and info["core"].startswith(str(target))
    assert info["plugins"] == ["sequences", "toy"] and info["config"]
    assert info["tfbind8"] == ["AGGTATCA", 1.0]  # the packaged table is read from the installed copy
    # the console entry point's module runs from the installed copy too
    cli = subprocess.run([sys.executable, "-m", "difftilt", "plugins"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert cli.returncode == 0 and [line.split()[0] for line in cli.stdout.splitlines()] == ["sequences", "toy"]
