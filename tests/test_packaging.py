"""pyproject.toml lists every library package, so that a non-editable install is complete."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_library_package_and_the_cli_are_packaged():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "curvlab").rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == on_disk | {"curvlab_cli"}
    assert setuptools["package-dir"] == {"curvlab_cli": "cli"}
    assert "templates/*.j2" in setuptools["package-data"]["curvlab"]
