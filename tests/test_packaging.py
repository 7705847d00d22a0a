"""The package metadata builds without setuptools deprecation warnings (they printed a banner three times per
install)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def deprecations(pyproject: Path) -> list[str]:
    """The deprecation warnings setuptools gives while reading `pyproject`."""
    pytest.importorskip("setuptools", minversion="77")  # the version pyproject.toml requires to build
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), pyproject)
    return [str(w.message).splitlines()[0] for w in caught if "Deprecation" in w.category.__name__]


def test_pyproject_reads_without_deprecation_warnings():
    assert deprecations(ROOT / "pyproject.toml") == []


def test_the_old_license_table_would_warn(tmp_path):
    old = (ROOT / "pyproject.toml").read_text().replace('license = "BSD-3-Clause"',
                                                         'license = { text = "BSD-3-Clause" }')
    assert 'license = { text' in old
    (tmp_path / "pyproject.toml").write_text(old)
    (tmp_path / "README.md").write_text("readme")
    assert any("project.license" in message for message in deprecations(tmp_path / "pyproject.toml"))
