"""The wheel ships every package: pyproject.toml lists them by hand, so a new subpackage must be
added there (an editable install, which the tests run on, would not notice it missing)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_of_minipeft_is_in_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "minipeft").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    # kernels/ ships inside the package, never as a top-level `kernels` module
    assert setuptools["package-dir"] == {"minipeft.kernels": "kernels"} and "minipeft.kernels" in listed
