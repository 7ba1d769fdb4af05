"""The wheel: the repository root becomes the `leaplm` package, with its data files, and nothing else."""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build from a copy of what git would ship (tracked plus new, unignored files): building in
    the checkout would write build/ there, and setuptools packs stale files it finds in build/."""
    src = tmp_path_factory.mktemp("src")
    listing = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             check=True, capture_output=True, text=True).stdout
    for name in filter(None, listing.split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("leaplm-*.whl")
    return path


@pytest.fixture(scope="module")
def names(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_everything_is_inside_the_leaplm_package(names):
    stray = [n for n in names if not re.match(r"(leaplm/|leaplm-[^/]+\.dist-info/)", n)]
    assert not stray, f"files outside leaplm/: {stray}"


@pytest.mark.parametrize(
    "name",
    [
        "leaplm/__init__.py",
        "leaplm/cli.py",
        "leaplm/config.py",
        "leaplm/train/trainer.py",
        "leaplm/data/tasks.py",
        "leaplm/models/zoo.py",
        "leaplm/models/tiny_teacher/tokenizer.json",
        "leaplm/configs/pretrain/tiny_teacher.yaml",
        "leaplm/launch/accelerate/cpu.yaml",
        "leaplm/launch/deepspeed/zero3.json",
        "leaplm/launch/slurm.sh",
    ],
)
def test_code_and_data_files_are_shipped(names, name):
    assert name in names


def test_every_repository_package_and_config_is_shipped(names):
    # A new subpackage or config that pyproject.toml does not list would silently stay behind.
    packages = {str(p.parent.relative_to(REPO)) for p in REPO.glob("*/__init__.py")} - {"tests"}
    configs = {str(p.relative_to(REPO)) for p in REPO.glob("configs/**/*.yaml")}
    launch = {str(p.relative_to(REPO)) for p in REPO.glob("launch/**/*") if p.suffix in {".yaml", ".json", ".sh"}}
    expected = {f"leaplm/{p}/__init__.py" for p in packages} | {f"leaplm/{p}" for p in configs | launch}
    assert expected <= set(names), sorted(expected - set(names))


def test_tests_are_not_shipped(names):
    assert not [n for n in names if n.startswith("leaplm/tests/")]


def test_wheel_declares_the_leaplm_command(wheel, names):
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    with zipfile.ZipFile(wheel) as zf:
        parser.read_string(zf.read(entry_points).decode())
    assert parser["console_scripts"]["leaplm"].strip() == "leaplm.cli:main"


def test_installed_console_script_resolves_to_the_cli():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="leaplm")
    from leaplm.cli import main

    assert script.load() is main


def test_installed_wheel_imports_and_finds_its_data_files(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    check = (
        "import leaplm, pathlib\n"
        "from leaplm.train.recipes import load_config\n"
        "root = pathlib.Path(leaplm.__file__).parent\n"
        f"assert root == pathlib.Path({str(target)!r}) / 'leaplm', root\n"
        "cfg = load_config(root / 'configs' / 'pretrain' / 'tiny_teacher.yaml')\n"
        "assert cfg.model.init['architecture'] == 'llama'\n"
        "assert (root / 'launch' / 'accelerate' / 'cpu.yaml').is_file()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
