"""Standard XMC data sets: machine-readable cards and a resumable, validating download.

The cards live in ``xmc_toolkit/data/datasets.json`` (package data); the human-readable versions
are ``datasets/<name>.md``. A card is a plain ``dict`` with the keys ``name``, ``aliases``,
``source``, ``citation``, ``homepage``, ``stats`` (``num_train``, ``num_test``, ``num_features``,
``num_labels``, ``avg_points_per_label``, ``avg_labels_per_point``), ``propensity`` (``A``,
``B``), ``download`` (``url``, ``filename``, ``archive``, ``format``, ``files``) and
``baselines`` (published P@1/3/5 in percent).

``download`` streams the archive to ``<file>.part`` (resuming with an HTTP ``Range`` request when a
partial file exists, restarting when the server ignores it), renames it when complete, extracts it
and checks every data file it names against the card's statistics.
"""

from __future__ import annotations

import bz2
import copy
import difflib
import gzip
import http.client
import json
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

from .._fileio import fsync_dir, output_error
from ..errors import OutputError, XMCError

__all__ = ["get_card", "list_cards", "download", "fetch_url", "extract_archive", "validate_files"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes per read while streaming
_CARDS: list[dict[str, Any]] | None = None


def _load_cards() -> list[dict[str, Any]]:
    global _CARDS
    if _CARDS is None:
        text = resources.files("xmc_toolkit.data").joinpath("datasets.json").read_text("utf-8")
        _CARDS = json.loads(text)["datasets"]
    return _CARDS


def list_cards() -> list[dict[str, Any]]:
    """Every standard data set's card (copies: callers may modify them)."""
    return copy.deepcopy(_load_cards())


def get_card(name: str) -> dict[str, Any]:
    """The card of data set ``name`` (case-insensitive; aliases such as ``eurlex`` work).

    Raises:
        XMCError: unknown name; the message lists the known names and the closest match.
    """
    key = name.strip().lower()
    for card in _load_cards():
        if key == card["name"].lower() or key in (a.lower() for a in card.get("aliases", ())):
            return copy.deepcopy(card)
    names = [c["name"] for c in _load_cards()]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise XMCError(f"unknown data set {name!r}{hint}; known data sets: {', '.join(names)}")


# ---------------------------------------------------------------------------------------------
# HTTP download with resume
# ---------------------------------------------------------------------------------------------


def _content_range_start(value: str | None) -> int | None:
    """Start offset of a ``Content-Range: bytes a-b/c`` header, or ``None``."""
    if not value or not value.strip().startswith("bytes"):
        return None
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def fetch_url(
    url: str,
    target: str | os.PathLike[str],
    *,
    show_progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``target`` through ``<target>.part``, resuming a partial download.

    A non-empty ``<target>.part`` is resumed with ``Range: bytes=<size>-``; a server that answers
    ``200`` instead of ``206`` (it ignores ranges) makes the download restart from byte 0. The
    part file is renamed to ``target`` only once complete (as long as the announced length).

    Raises:
        XMCError: the server refused, the connection failed, or the transfer ended early (the
            part file is kept: run the same command again to resume).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "xmc-toolkit"}
    if have > 0:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have > 0:
            # The part file is at least as long as the resource: start over to be safe.
            logger.warning("server refused to resume %s (HTTP 416); restarting", url)
            part.unlink()
            return fetch_url(url, target, show_progress=show_progress, timeout=timeout)
        raise XMCError(
            f"downloading {url} failed: HTTP {exc.code} {exc.reason}; check the URL "
            "or pass another one with --url"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise XMCError(
            f"cannot connect to {url}: {exc}; check the network or pass a local copy with "
            "--url file:///path/to/archive"
        ) from exc

    with response:
        status = getattr(response, "status", None) or response.getcode() or 200
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None and length.isdigit() else None
        if have > 0 and status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != have:
                raise XMCError(
                    f"server resumed {url} at byte {start}, expected {have}; delete {part} "
                    "and download again"
                )
            mode = "ab"
            logger.info("resuming %s at byte %d", url, have)
        else:
            if have > 0:
                logger.info("server ignored the Range request for %s; restarting", url)
            have = 0
            mode = "wb"
        total = None if remaining is None else have + remaining
        progress = task = None
        if show_progress:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
            progress.start()
            task = progress.add_task(f"download {target.name}", total=total, completed=have)
        written = have
        try:
            with open(part, mode) as fh:
                while True:
                    try:
                        buf = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise XMCError(
                            f"download of {url} interrupted after {written} bytes ({exc}); "
                            "run the same command again to resume"
                        ) from exc
                    if not buf:
                        break
                    try:
                        fh.write(buf)
                    except OSError as exc:  # disk full, quota: keep what was written
                        raise OutputError(f"{output_error(part, exc)}; what was written so "
                                          "far is kept: free space and run the same command "
                                          "again to resume") from exc
                    written += len(buf)
                    if progress is not None and task is not None:
                        progress.update(task, completed=written)
                try:  # the bytes on disk before the rename makes them the target
                    fh.flush()
                    os.fsync(fh.fileno())
                except OSError as exc:
                    raise output_error(part, exc) from exc
        finally:
            if progress is not None:
                progress.stop()
    if total is not None and written != total:
        raise XMCError(
            f"download of {url} ended at {written} of {total} bytes; run the same command "
            f"again to resume from {part}"
        )
    try:
        os.replace(part, target)
    except OSError as exc:
        raise output_error(target, exc, "rename the finished download to") from exc
    fsync_dir(target.parent)  # the rename itself durable (the same steps as _fileio's writer)
    logger.info("downloaded %s (%d bytes)", target, written)
    return target


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------


def _safe_member(root: Path, name: str) -> Path:
    dest = (root / name).resolve()
    if not dest.is_relative_to(root.resolve()):
        raise XMCError(f"archive member {name!r} would be written outside {root}; refusing")
    return dest


def _archive_kind(path: Path, kind: str | None) -> str | None:
    if kind:
        return kind.lower()
    name = path.name.lower()
    for suffix, k in ((".tar.gz", "tar.gz"), (".tgz", "tar.gz"), (".tar.bz2", "tar.bz2"),
                      (".tar", "tar"), (".zip", "zip"), (".bz2", "bz2"), (".gz", "gz")):
        if name.endswith(suffix):
            return k
    return None


def extract_archive(path: str | os.PathLike[str], dest: str | os.PathLike[str],
                    kind: str | None = None) -> Path:
    """Extract a ``zip``, ``tar``, ``tar.gz``, ``tar.bz2``, ``bz2`` or ``gz`` archive into ``dest``.

    ``kind`` overrides the guess from the file name; ``"none"`` copies nothing and returns
    ``path``'s folder. Members that would land outside ``dest`` are refused.

    Returns:
        ``dest``.
    """
    path, dest = Path(path), Path(dest)
    k = _archive_kind(path, kind)
    dest.mkdir(parents=True, exist_ok=True)
    if k in (None, "none"):
        return path.parent
    try:
        if k == "zip":
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    _safe_member(dest, member)
                zf.extractall(dest)
        elif k in ("tar", "tar.gz", "tgz", "tar.bz2"):
            with tarfile.open(path, "r:*") as tf:
                for member in tf.getmembers():
                    _safe_member(dest, member.name)
                    if member.issym() or member.islnk():
                        raise XMCError(f"archive {path} contains a link {member.name!r}; refusing")
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, filter="data")
                else:  # pragma: no cover - Python < 3.12 without extraction filters
                    tf.extractall(dest)
        elif k in ("bz2", "gz"):
            opener = bz2.open if k == "bz2" else gzip.open
            out = dest / path.name[: path.name.lower().rfind("." + k)]
            with opener(path, "rb") as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        else:
            raise XMCError(
                f"unknown archive kind {k!r} for {path}; use zip, tar.gz, tar.bz2 or bz2"
            )
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise XMCError(
            f"cannot extract {path} as {k}: {exc}; the download may be an HTML page (Google Drive "
            "asks for confirmation on large files): download it in a browser and pass "
            "--url file:///path/to/archive"
        ) from exc
    return dest


# ---------------------------------------------------------------------------------------------
# Validation against the card
# ---------------------------------------------------------------------------------------------


def _find_file(root: Path, name: str) -> Path | None:
    direct = root / name
    if direct.is_file():
        return direct
    hits = sorted(p for p in root.rglob(Path(name).name) if p.is_file())
    return hits[0] if hits else None


def validate_files(root: str | os.PathLike[str], card: dict[str, Any]) -> dict[str, Path]:
    """Load every file named in ``card["download"]["files"]`` under ``root`` and check its shape.

    Returns:
        Role (``train``, ``test``, ``data``) -> path of the validated file.

    Raises:
        XMCError: a file is missing, or its ``N``/``D``/``L`` differ from the card (the message
            names the expected and the found values).
    """
    from . import formats  # the data-formats module (load(path, fmt=None) -> XMCDataset)

    root = Path(root)
    spec = card.get("download", {})
    fmt = spec.get("format")
    found: dict[str, Path] = {}
    for role, entry in spec.get("files", {}).items():
        path = _find_file(root, entry["name"])
        if path is None:
            present = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            raise XMCError(
                f"{card['name']}: expected {role} file {entry['name']!r} under {root}, found "
                f"{present[:10]}; fix the card's download.files or pass --url to another copy"
            )
        ds = formats.load(path, fmt=fmt)
        got = {"num_points": ds.num_points, "num_features": ds.num_features,
               "num_labels": ds.num_labels}
        bad = [
            f"{key} expected {entry[key]} found {got[key]}"
            for key in ("num_points", "num_features", "num_labels")
            if entry.get(key) is not None and int(entry[key]) != got[key]
        ]
        if bad:
            raise XMCError(
                f"{card['name']}: {path} does not match the card ({'; '.join(bad)}); the file is "
                "corrupt or another version of the data set"
            )
        logger.info("%s %s: %s ok (N=%d D=%d L=%d)", card["name"], role, path,
                    got["num_points"], got["num_features"], got["num_labels"])
        found[role] = path
    return found


def download(
    name: str,
    dest_dir: str | os.PathLike[str],
    *,
    url: str | None = None,
    show_progress: bool = True,
    card: dict[str, Any] | None = None,
    validate: bool = True,
) -> Path:
    """Download, extract and validate a standard data set.

    Args:
        name: data set name (see :func:`list_cards`); ignored for lookup when ``card`` is given.
        dest_dir: parent folder; the data set lands in ``dest_dir/<card name>/``.
        url: override the card's URL (``http(s)://`` or ``file://``, e.g. a mirror or a copy
            downloaded by hand).
        show_progress: show a rich progress bar while downloading.
        card: a custom card (same keys as the bundled ones) instead of the bundled one.
        validate: load the data files and compare ``N``/``D``/``L`` with the card.

    Returns:
        The folder that holds the data set's files.

    Raises:
        XMCError: unknown data set, no URL known, network failure, bad archive, or statistics
            that do not match the card.
    """
    card = copy.deepcopy(card) if card is not None else get_card(name)
    spec = card.setdefault("download", {})
    url = url or spec.get("url")
    if not url:
        raise XMCError(
            f"no download URL is known for {card['name']}; get it from "
            f"{card.get('homepage', 'the Extreme Classification Repository')} and pass --url"
        )
    folder = Path(dest_dir) / card["name"]
    folder.mkdir(parents=True, exist_ok=True)
    from_card = url == spec.get("url")
    filename = spec.get("filename") if from_card else None
    if not filename:
        filename = Path(urllib.parse.urlparse(url).path).name or f"{card['name']}.download"
    archive_path = folder / filename
    t0 = time.perf_counter()
    if archive_path.exists():
        logger.info("%s already downloaded; reusing it (delete it to download again)",
                    archive_path)
    else:
        fetch_url(url, archive_path, show_progress=show_progress)
    if from_card:
        kind = _archive_kind(archive_path, spec.get("archive"))
    else:  # another URL: trust its file name first
        kind = _archive_kind(archive_path, None) or _archive_kind(archive_path, spec.get("archive"))
    if kind not in (None, "none"):
        extract_archive(archive_path, folder, kind)
    if validate and spec.get("files"):
        validate_files(folder, card)
    logger.info("%s ready in %s (%.1f s)", card["name"], folder, time.perf_counter() - t0)
    return folder
