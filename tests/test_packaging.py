"""The wheel as a user gets it: what it holds (LICENSE, py.typed, the configs, one console script per command),
and, installed into a fresh virtual environment outside the clone, a training run and the commands' help."""

from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("train", "evaluate", "predict", "visualize", "export")


def run(args: list[str | Path], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the working tree, built by pip with hatchling (without network when hatchling is installed)."""
    dist = tmp_path_factory.mktemp("dist")
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", ROOT, "-w", dist], cwd=dist)
    (built,) = dist.glob("vitrain-*.whl")
    return built


def test_the_wheel_holds_the_license_the_types_marker_the_configs_and_the_commands(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        license_file = next(n for n in names if ".dist-info/" in n and n.endswith("/LICENSE"))
        assert "Apache License" in z.read(license_file).decode()
    assert "vitrain/py.typed" in names
    assert {"vitrain/configs/train.yaml", "vitrain/configs/export.yaml"} <= names
    assert {f"vitrain/configs/hydra/help/{c}.yaml" for c in COMMANDS} <= names
    for command in COMMANDS:
        assert f"vitrain-{command} = vitrain.{command}:main" in entry_points
    assert not any(n.startswith(("tests/", "docs/", "scripts/")) for n in names)
    # the Optuna sweeper, where Hydra looks for plugins: hydra_plugins is a namespace package (no __init__.py)
    assert {f"hydra_plugins/vitrain_optuna_sweeper/{m}.py" for m in ("config", "optuna_sweeper", "_search_space")} \
        <= names and "hydra_plugins/__init__.py" not in names


def borrow_site_packages(venv: Path) -> None:
    """Give ``venv`` the packages of the Python running the tests, after its own: a ``.pth`` file that adds this
    interpreter's site-packages folders (their own ``.pth`` files processed). ``--system-site-packages`` would give
    the *base* Python's, which lack torch and hydra when the tests run from a virtual environment."""
    folders = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (own,) = (venv / "lib").glob("python*/site-packages")
    (own / "_borrowed_site_packages.pth").write_text(
        f"import site; list(map(site.addsitedir, {[f for f in folders if Path(f).is_dir()]!r}))\n")


@pytest.mark.slow
def test_installed_wheel_trains_and_explains_itself(wheel: Path, tmp_path: Path) -> None:
    """A fresh venv outside the clone (torch and the rest from the running interpreter's site-packages, a venv's
    or the system's), the wheel installed into it: its own copy of vitrain is imported, ``vitrain-train`` runs an
    epoch, ``--help`` shows the template."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    borrow_site_packages(venv)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    run([python, "-c", "import hydra, torch"], cwd=tmp_path)  # the running environment's packages, seen from the venv
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel], cwd=tmp_path)  # borrowed pip
    where = run([python, "-c", "import vitrain; print(vitrain.__file__)"], cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv), f"imported {where}, not the wheel's copy"

    train = run([bin_dir / "vitrain-train", "trainer.epochs=1", "trainer.progress=false", "hydra.run.dir=run"],
                cwd=tmp_path)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file(), train.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").is_file()

    train_help = run([bin_dir / "vitrain-train", "--help"], cwd=tmp_path).stdout
    assert train_help.startswith("vitrain-train (python -m vitrain.train): train a Vision Transformer")
    assert "model: " in train_help and "vit_nano" in train_help and "optimizer: adamw" in train_help  # the groups
    assert train_help.count("vitrain-train ") >= 4 and "vitrain-train --cfg job" in train_help  # examples, the config
    export_help = run([bin_dir / "vitrain-export", "--help"], cwd=tmp_path).stdout
    assert export_help.startswith("vitrain-export (python -m vitrain.export)")
    assert "format=timm" in export_help and "--cfg job" in export_help
