"""A non-editable install (a wheel) carries what the kit needs and finds it, checked without building one.

pyproject.toml ships the YAML presets of configs/ as package data of ``clara.configs`` (package-dir
``configs``).  These tests read that declaration: every YAML must be matched by it, every package of
clara/ and meld/ must be listed, and the installed layout it describes (copied to a temporary
folder, away from the checkout) must load the presets the CLIs use by default.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def package_dir(package: str) -> Path:
    """The source folder of ``package`` as setuptools maps it (flat layout unless package-dir says)."""
    mapped = SETUPTOOLS.get("package-dir", {})
    if package in mapped:
        return ROOT / mapped[package]
    parent, _, name = package.rpartition(".")
    return package_dir(parent) / name if parent else ROOT / name


def package_data(package: str) -> set[Path]:
    """The files the wheel ships as ``package``'s data: its package-data globs, relative to its folder."""
    folder = package_dir(package)
    return {Path(match).relative_to(folder)
            for pattern in SETUPTOOLS.get("package-data", {}).get(package, [])
            for match in glob.glob(str(folder / pattern), recursive=True) if Path(match).is_file()}


def config_package() -> str:
    packages = [name for name, folder in SETUPTOOLS.get("package-dir", {}).items() if folder.strip("/") == "configs"]
    assert len(packages) == 1, "pyproject.toml maps no package (or several) onto configs/"
    return packages[0]


def test_every_config_yaml_ships_as_package_data():
    yamls = {path.relative_to(ROOT / "configs") for path in (ROOT / "configs").rglob("*.y*ml")}
    assert len(yamls) > 10  # the walk really saw the presets
    package = config_package()
    assert package in SETUPTOOLS["packages"]
    assert yamls - package_data(package) == set()


def test_every_python_package_is_listed():
    # packages is an explicit list (clara.configs needs one), so a new subpackage must be added by hand
    found = {".".join(path.parent.relative_to(ROOT).parts)
             for top in ("clara", "meld") for path in (ROOT / top).rglob("*.py")}
    assert found - set(SETUPTOOLS["packages"]) == set()


def test_torch_and_torchaudio_are_pinned_as_a_pair():
    pins = {dep.split("==")[0]: dep.split("==")[1] for dep in PYPROJECT["project"]["dependencies"] if "==" in dep}
    assert pins.get("torch") is not None and pins.get("torch") == pins.get("torchaudio")


def test_slow_and_gpu_tests_are_registered_and_off_by_default():
    pytest_ini = PYPROJECT["tool"]["pytest"]["ini_options"]
    assert {marker.split(":")[0] for marker in pytest_ini["markers"]} >= {"slow", "gpu"}
    assert "-m 'not slow and not gpu'" in pytest_ini["addopts"]


LOAD_DEFAULTS = textwrap.dedent("""
    import clara, meld
    from clara.model_config import load_model_config
    from clara.pretrain import load_config as pretrain_config
    from meld.captions import load_captions
    from meld.finetune import load_config as finetune_config
    from meld.prompts import load_prompts
    from meld.sweep import load_sweep_config

    load_model_config("tiny")
    finetune_config(None, [])
    finetune_config("linear_probe", [])
    pretrain_config(None, [])
    load_sweep_config(None)
    load_prompts()
    load_captions()
    print(clara.__file__)
    print(meld.__file__)
""")


def test_the_installed_layout_loads_its_presets(tmp_path):
    """clara/ and meld/ as a wheel installs them (configs/ under the package pyproject maps it to), imported
    from a folder outside the checkout: the default presets of every CLI resolve there."""
    site = tmp_path / "site"
    for package in SETUPTOOLS["packages"]:
        target = site.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for module in package_dir(package).glob("*.py"):
            shutil.copy2(module, target / module.name)
        for data in package_data(package):
            (target / data).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package_dir(package) / data, target / data)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "MELD_CLARA_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", LOAD_DEFAULTS], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [Path(line).parent.parent for line in result.stdout.split()] == [site, site]  # not the checkout's
