"""
The built wheel carries what an installed package reads at run time (not only what a checkout has).

Built without isolation from the dev environment's setuptools (the `dev` extra pins the build-system requirement), from
a copy of the package: setuptools never empties an in-tree `build/lib`, so a build in the checkout would also ship
modules that have since been moved or deleted.
"""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_wheel_ships_configs_templates_and_every_subpackage(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(
        os.path.join(ROOT, "token_clean_trainer"),
        source / "token_clean_trainer",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), source],
        check=True,
        capture_output=True,
    )
    (wheel,) = glob.glob(str(tmp_path / "token_clean_trainer-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    package = os.path.join(ROOT, "token_clean_trainer")
    expected = set()
    for pattern in ("accelerate_configs/*.yaml", "chat_templates/*.jinja", "report/templates/*.html", "**/*.py"):
        for path in glob.glob(os.path.join(package, pattern), recursive=True):
            expected.add("token_clean_trainer/" + os.path.relpath(path, package).replace(os.sep, "/"))
    assert "token_clean_trainer/report/templates/tokens.html" in expected
    assert "token_clean_trainer/commands/train.py" in expected
    assert expected - names == set()
    # ... and no module the checkout does not have (e.g. `report.py` beside the `report/` package that replaced it).
    assert {name for name in names if name.endswith(".py")} == {name for name in expected if name.endswith(".py")}
