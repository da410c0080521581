"""./just, the README's quick start: on a machine with only python3 (no `just`, no pip on
PATH, no .venv), its first run creates .venv, installs the pinned just (and pip where
python3 has no ensurepip) and hands over to the Justfile; later runs go straight there.

Each test runs the script in a copy of the files it reads, under ``env -i`` with a PATH
of a few named tools, so nothing of this machine's setup (a `just`, curl, pyenv) leaks in.
The project install that recipes add (`pip install -e .[dev]`, minutes) is not run here:
CI runs it through the same script (.ci/run calls ./just test).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "just"
FILES = ("just", "Justfile", "pyproject.toml")
# What the script runs besides python3 and the tools a recipe's sh needs.
TOOLS = ("sh", "dirname", "rm", "mkdir")
RECIPES = ("default", "install", "demo", "test", "serve", "bench", "train")
# Network settings a user's machine may need to reach PyPI: kept, nothing else is.
PASS_THROUGH = re.compile(r"(?i)^(https?_proxy|no_proxy|all_proxy|ssl_cert_(file|dir)"
                          r"|pip_(index_url|extra_index_url|cert|trusted_host))$")


def _pinned(name: str) -> str:
    found = re.search(rf"^{name}=(\S+)$", SCRIPT.read_text(), re.M)
    assert found, f"{SCRIPT}: no {name}= line"
    return found.group(1)


JUST_VERSION = _pinned("JUST_VERSION")
PIP_VERSION = _pinned("PIP_VERSION")


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/rust-just/", timeout=15):
            return True
    except OSError:
        return False


needs_pypi = pytest.mark.skipif(not _pypi_reachable(),
                                reason="PyPI is not reachable: the bootstrap installs just from it")


def _python() -> str:
    # The interpreter itself, not a venv's or pyenv's shim: it runs from any PATH.
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _checkout(tmp_path: Path, python: str | None = None, tools=TOOLS) -> tuple[Path, Path]:
    """A copy of the files ./just reads and a bin folder holding only ``tools`` and python3."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    repo.mkdir()
    bin_dir.mkdir()
    for name in FILES:
        shutil.copy2(ROOT / name, repo / name)
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if python is None:
        (bin_dir / "python3").symlink_to(_python())
    else:
        (bin_dir / "python3").write_text(python.replace("REAL", _python()))
        (bin_dir / "python3").chmod(0o755)
    return repo, bin_dir


def _run(repo: Path, bin_dir: Path, *args: str, cwd: Path | None = None,
         **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if PASS_THROUGH.match(k)}
    env.update(PATH=str(bin_dir), HOME=str(repo.parent / "home"), **env_vars)
    cwd = cwd or repo
    script = os.path.relpath(repo / "just", cwd)  # "repo/just" as typed, or "./just"
    script = script if os.sep in script else "./" + script
    return subprocess.run([script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _progress(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("o2v-jax: ")]


@needs_pypi
def test_first_run_installs_the_pinned_just_and_hands_over(tmp_path):
    repo, bin_dir = _checkout(tmp_path)
    assert shutil.which("just", path=str(bin_dir)) is None
    first = _run(repo, bin_dir)  # the default recipe: the list
    assert first.returncode == 0, first.stderr
    assert "Available recipes" in first.stdout
    listed = {line.split()[0] for line in first.stdout.splitlines()[1:]}
    assert listed == set(RECIPES)
    python = subprocess.run([_python(), "-c", "import platform; print(platform.python_version())"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert _progress(first.stderr) == [
        f"o2v-jax: creating .venv (Python {python})",
        f"o2v-jax: installing just {JUST_VERSION} and pip {PIP_VERSION} into .venv"]
    assert "deprecat" not in first.stderr.lower()
    assert (repo / ".venv" / "bin" / "just").is_file()

    # Installed: straight to the pinned just, silently, even with another `just` first on PATH.
    (bin_dir / "just").write_text("#!/bin/sh\necho not the pinned just\nexit 3\n")
    (bin_dir / "just").chmod(0o755)
    again = _run(repo, bin_dir, "--version")
    assert (again.returncode, again.stdout.strip(), again.stderr) == (0, f"just {JUST_VERSION}", "")
    # From another folder (with a CDPATH, which makes a plain `cd` print): this Justfile.
    elsewhere = _run(repo, bin_dir, "--list", cwd=tmp_path, CDPATH=str(tmp_path))
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert elsewhere.stdout == first.stdout


# python3 as on Debian without the python3-venv package: `-m venv` leaves a venv without
# pip behind and fails; `-m venv --without-pip` works.
NO_ENSUREPIP = """#!/bin/sh
case " $* " in
*" --without-pip "*) ;;
*" -m venv "*)
  for last; do :; done
  mkdir -p "$last/bin"
  echo "The virtual environment was not created successfully because ensurepip is not" >&2
  exit 1 ;;
esac
exec REAL "$@"
"""


@needs_pypi
def test_without_ensurepip_pip_comes_from_its_pinned_wheel(tmp_path):
    # No curl either (as in a bare Debian container): python3 downloads the wheel.
    repo, bin_dir = _checkout(tmp_path, python=NO_ENSUREPIP)
    done = _run(repo, bin_dir, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"just {JUST_VERSION}"
    assert _progress(done.stderr)[1:] == [
        f"o2v-jax: installing pip {PIP_VERSION} into .venv (python3 has no ensurepip)",
        f"o2v-jax: installing just {JUST_VERSION} and pip {PIP_VERSION} into .venv"]
    assert "ensurepip is not" not in done.stderr  # the fallback's cause is not an error
    pip = subprocess.run([repo / ".venv/bin/python", "-m", "pip", "--version"],
                         capture_output=True, text=True, check=True)
    assert pip.stdout.startswith(f"pip {PIP_VERSION} ")
    assert not list((repo / ".venv").glob("*.whl"))


@needs_pypi
def test_a_pip_wheel_with_the_wrong_sha256_is_not_installed(tmp_path):
    repo, bin_dir = _checkout(tmp_path, python=NO_ENSUREPIP)
    text = (repo / "just").read_text()
    (repo / "just").write_text(re.sub(r"^PIP_WHEEL_SHA256=\S+$", "PIP_WHEEL_SHA256=" + "0" * 64,
                                      text, flags=re.M))
    done = _run(repo, bin_dir, "--version")
    assert done.returncode == 1
    assert "wrong sha256, not installed" in done.stderr
    assert not list((repo / ".venv").glob("lib/python*/site-packages/pip"))
    assert not list((repo / ".venv").glob("*.whl"))


def test_an_old_python3_is_refused_with_what_is_needed(tmp_path):
    # python3 that says it is 3.10.12 to the version checks (`-c CODE`), and runs otherwise.
    old = """#!/bin/sh
[ "$1" = -c ] && exec REAL -c "import sys; sys.version_info = (3, 10, 12, 'final', 0); exec(sys.argv[1])" "$2"
exec REAL "$@"
"""
    repo, bin_dir = _checkout(tmp_path, python=old)
    done = _run(repo, bin_dir, "demo")
    assert done.returncode == 1
    assert done.stderr == ("o2v-jax: error: python3 is Python 3.10.12; o2v-jax needs Python >= 3.11 "
                           "(set O2V_PYTHON=/path/to/python3.11)\n")
    assert not (repo / ".venv").exists()


def test_no_python3_is_a_clear_error(tmp_path):
    repo, bin_dir = _checkout(tmp_path)
    (bin_dir / "python3").unlink()
    done = _run(repo, bin_dir)
    assert done.returncode == 1
    assert done.stderr.startswith("o2v-jax: error: python3 not found; o2v-jax needs Python >= 3.11")


def test_the_script_is_committed_executable():
    # A fresh clone runs ./just only if git records it as executable.
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-s", "just"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert listed.startswith("100755 "), listed or "./just is not committed"
