"""What a user installs works: the wheel and the sdist, built here the way pip builds them.

The wheel must carry the CUDA sources (grpo_kernels/csrc/) that grpo_kernels.sweep.cuda compiles on
first use, and the licence; the sdist must carry csrc/ and the licence, and a wheel built from
it the sources again. The wheel is unpacked (not installed: a fresh venv would need torch) and
imported from there, away from the checkout, to check that grpo_kernels.sweep.cuda finds the shipped
sources. The `trl` extra is read from the wheel's metadata.

The builds call setuptools' PEP 517 hooks in a subprocess, as `pip wheel --no-build-isolation`
and `python -m build --no-isolation` do (offline: the venv's setuptools), on a copy of the
working tree, so the checkout gets no build/ or egg-info and no stale build/lib leaks in.
GRPO_KERNELS_NO_CUDA_EXTENSION=1 keeps a machine with nvcc from compiling the extension here.

Last, the autouse fixture of conftest.py that restores os.environ after every test.
"""
from __future__ import annotations

import email.parser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CUDA_FILES = ("grpo_sweep.cu", "two_pass.cu", "binding.cpp", "grpo_sweep.h", "two_pass.h", "grpo_device.cuh")
_IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
                                  ".pytest_cache", "*.so", ".whl", "results")


def _build(source: Path, out: Path, *hooks: str) -> list[Path]:
    """Run setuptools' build hooks (build_wheel, build_sdist) in `source`; returns the built files."""
    calls = "; ".join(f"print('BUILT', b.{hook}({str(out)!r}))" for hook in hooks)  # setuptools logs to stdout
    env = {**os.environ, "GRPO_KERNELS_NO_CUDA_EXTENSION": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta as b; {calls}"],
                          cwd=source, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return [out / line.split()[1] for line in done.stdout.splitlines() if line.startswith("BUILT ")]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=_IGNORED)
    assert not (source / "grpo_kernels" / "csrc").exists()  # the sources live in csrc/ only
    wheel, sdist = _build(source, tmp / "dist", "build_wheel", "build_sdist")
    return {"wheel": wheel, "sdist": sdist, "tmp": tmp}


def _wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def _wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


def test_wheel_ships_cuda_sources_and_license(dists):
    wheel = dists["wheel"]
    names = _wheel_names(wheel)
    with zipfile.ZipFile(wheel) as zf:
        for name in CUDA_FILES:
            assert f"grpo_kernels/csrc/{name}" in names, sorted(names)
            assert zf.read(f"grpo_kernels/csrc/{name}") == (ROOT / "csrc" / name).read_bytes()
        licences = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert licences, sorted(names)
        assert zf.read(licences[0]) == (ROOT / "LICENSE").read_bytes()
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert _wheel_metadata(wheel)["License-Expression"] == "Apache-2.0"


def test_sdist_ships_csrc_and_license_and_builds_a_complete_wheel(dists):
    sdist, tmp = dists["sdist"], dists["tmp"]
    with tarfile.open(sdist) as tf:
        names = set(tf.getnames())
        top = sorted(names)[0].split("/")[0]
        for name in CUDA_FILES:
            assert f"{top}/csrc/{name}" in names, sorted(names)
        assert f"{top}/LICENSE" in names
        assert f"{top}/setup.py" in names and f"{top}/MANIFEST.in" in names
        tf.extractall(tmp / "from_sdist", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    # pip install of the sdist builds a wheel from it: that wheel must ship the sources too.
    (wheel,) = _build(tmp / "from_sdist" / top, tmp / "dist_from_sdist", "build_wheel")
    names = _wheel_names(wheel)
    for name in CUDA_FILES:
        assert f"grpo_kernels/csrc/{name}" in names, sorted(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_installed_wheel_finds_its_cuda_sources(dists):
    """grpo_kernels.sweep.cuda imported from the unpacked wheel, with no checkout around it, finds the
    sources it ships (the first-use build of backend='cuda' compiles those)."""
    site = dists["tmp"] / "site" / "lib"
    with zipfile.ZipFile(dists["wheel"]) as zf:
        zf.extractall(site)
    assert not (site.parent / "csrc").exists()  # where the checkout's csrc/ would be
    probe = ("import grpo_kernels.sweep.cuda as c; print(c.__file__); print(c.source_dir()); "
             "print(c.source_dir() is not None and all((c.source_dir() / n).is_file() for n in c.SOURCES))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=dists["tmp"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    module_file, source_dir, complete = done.stdout.split()[-3:]
    assert Path(module_file).resolve().is_relative_to(site.resolve()), module_file  # not the editable checkout
    assert Path(source_dir).resolve() == (site / "grpo_kernels" / "csrc").resolve()
    assert complete == "True"


def test_checkout_finds_the_repository_csrc():
    from grpo_kernels.sweep import cuda

    assert cuda.source_dir() is not None
    assert all((cuda.source_dir() / name).is_file() for name in cuda.SOURCES)
    assert (ROOT / "csrc").resolve() in [d.resolve() for d in cuda.CSRC_DIRS]


def test_trl_extra_covers_the_tested_versions(dists):
    """`pip install grpo_kernels[trl]` brings trl and accelerate in versions that include the ones
    the tests run."""
    metadata = _wheel_metadata(dists["wheel"])
    assert "trl" in metadata.get_all("Provides-Extra")
    extra = {}
    for line in metadata.get_all("Requires-Dist"):
        requirement = Requirement(line)
        if requirement.marker is not None and requirement.marker.evaluate({"extra": "trl"}):
            extra[requirement.name] = requirement
    assert set(extra) == {"trl", "accelerate"}, extra
    for name, requirement in extra.items():
        installed = importlib.metadata.version(name)
        assert requirement.specifier.contains(installed, prereleases=True), (name, installed, str(requirement))


# The autouse fixture of conftest.py restores os.environ after each test. The two tests run in
# file order (pytest's default); the second checks what the first left behind, and skips when
# the first did not run (e.g. under -k).
_PREEXISTING = "GRPO_KERNELS_TEST_PREEXISTING"
_ADDED = "GRPO_KERNELS_TEST_ADDED"
_environ_leaked: list[dict] = []
os.environ.setdefault(_PREEXISTING, "original")  # set before any test runs: one for a test to change


def test_environ_1_changes_leak_out_of_this_test():
    before = {key: os.environ.get(key) for key in (_PREEXISTING, _ADDED, "HOME")}
    assert before[_ADDED] is None and before[_PREEXISTING] == "original"
    os.environ[_ADDED] = "1"          # added, as GRPOConfig(bf16=True) adds ACCELERATE_MIXED_PRECISION
    os.environ[_PREEXISTING] = "changed"  # changed
    if "HOME" in os.environ:
        del os.environ["HOME"]        # removed
    _environ_leaked.append(before)


def test_environ_2_is_restored_for_the_next_test():
    if not _environ_leaked:
        pytest.skip("runs after test_environ_1_changes_leak_out_of_this_test")
    before = _environ_leaked[0]
    assert {key: os.environ.get(key) for key in before} == before
