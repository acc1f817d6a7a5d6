"""Tests of the data set cards and the resumable download (xmc_toolkit.data.registry)."""

from __future__ import annotations

import http.server
import io
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from xmc_toolkit.data import registry
from xmc_toolkit.errors import OutputError, XMCError

EXPECTED_NAMES = {
    "Bibtex", "Delicious", "Mediamill", "EURLex-4K", "Wiki10-31K", "AmazonCat-13K",
    "Amazon-670K", "Wikipedia-500K", "Amazon-3M",
}
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# cards
# ---------------------------------------------------------------------------------------------


def test_list_cards_has_every_standard_set():
    cards = registry.list_cards()
    assert {c["name"] for c in cards} == EXPECTED_NAMES
    for c in cards:
        s = c["stats"]
        for key in ("num_train", "num_test", "num_features", "num_labels",
                    "avg_points_per_label", "avg_labels_per_point"):
            assert s[key] > 0, (c["name"], key)
        assert set(c["propensity"]) == {"A", "B"}
        assert c["source"] and c["citation"] and c["homepage"].startswith("http")
        assert c["baselines"], c["name"]
        for b in c["baselines"]:
            assert 0 < b["P@5"] <= b["P@3"] <= b["P@1"] <= 100, (c["name"], b)
        files = c["download"]["files"]
        assert set(files) in ({"data"}, {"train", "test"})
        for role, f in files.items():
            assert f["num_labels"] == s["num_labels"] and f["num_features"] == s["num_features"]
        if "data" in files:
            assert files["data"]["num_points"] == s["num_train"] + s["num_test"]
        else:
            assert files["train"]["num_points"] == s["num_train"]
            assert files["test"]["num_points"] == s["num_test"]
        # a human-readable card exists beside the machine-readable one
        assert (REPO / "datasets" / f"{c['name']}.md").is_file(), c["name"]


def test_avg_statistics_are_consistent():
    """avg labels/point * N / L reproduces avg points/label over train+test or train only."""
    for c in registry.list_cards():
        s = c["stats"]
        per_label = [
            s["avg_labels_per_point"] * n / s["num_labels"]
            for n in (s["num_train"] + s["num_test"], s["num_train"])
        ]
        assert min(abs(p / s["avg_points_per_label"] - 1) for p in per_label) < 0.02, c["name"]


def test_propensity_parameters():
    assert registry.get_card("Bibtex")["propensity"] == {"A": 0.55, "B": 1.5}
    for name in ("AmazonCat-13K", "Amazon-670K", "Amazon-3M"):
        assert registry.get_card(name)["propensity"] == {"A": 0.6, "B": 2.6}
    assert registry.get_card("Wikipedia-500K")["propensity"] == {"A": 0.5, "B": 0.4}


def test_bibtex_published_numbers():
    card = registry.get_card("bibtex")
    by_method = {b["method"]: b for b in card["baselines"]}
    assert (by_method["Parabel"]["P@1"], by_method["Parabel"]["P@3"],
            by_method["Parabel"]["P@5"]) == (64.53, 38.56, 27.94)
    assert (by_method["PfastreXML"]["P@1"], by_method["PfastreXML"]["P@3"],
            by_method["PfastreXML"]["P@5"]) == (63.46, 39.22, 29.14)
    assert card["stats"]["num_train"] == 4880 and card["stats"]["num_labels"] == 159


def test_get_card_case_insensitive_aliases_and_errors():
    assert registry.get_card("EURLEX-4k")["name"] == "EURLex-4K"
    assert registry.get_card("eurlex")["name"] == "EURLex-4K"
    assert registry.get_card("wiki-500k")["name"] == "Wikipedia-500K"
    with pytest.raises(XMCError) as info:
        registry.get_card("Bibtx")
    msg = str(info.value)
    assert "Bibtex" in msg and "Amazon-3M" in msg and "did you mean" in msg
    # returned cards are copies
    registry.get_card("Bibtex")["stats"]["num_train"] = 0
    assert registry.get_card("Bibtex")["stats"]["num_train"] == 4880


def test_cards_match_shared_bibtex(bibtex_train: Path):
    header = bibtex_train.read_text().split("\n", 1)[0].split()
    s = registry.get_card("Bibtex")["stats"]
    assert [int(v) for v in header] == [s["num_train"], s["num_features"], s["num_labels"]]


# ---------------------------------------------------------------------------------------------
# a local HTTP server that supports (or ignores) Range requests
# ---------------------------------------------------------------------------------------------


class _Server:
    def __init__(self, files: dict[str, bytes], honor_range: bool = True) -> None:
        self.files = files
        self.honor_range = honor_range
        self.cut_after: int | None = None  # send only this many body bytes, then hang up
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and server.honor_range:
                    start = int(m.group(1))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    chunk = body[start:]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    chunk = body
                    self.send_response(200)
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                if server.cut_after is not None:
                    chunk = chunk[: server.cut_after]
                    server.cut_after = None
                    self.close_connection = True
                self.wfile.write(chunk)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def served() -> Iterator[_Server]:
    with _Server({}) as s:
        yield s


def _xc_text(n: int, d: int, l: int) -> bytes:
    lines = [f"{n} {d} {l}"]
    for i in range(n):
        labels = ",".join(str(j) for j in sorted({i % l, (3 * i + 1) % l}))
        fids = sorted({i % d, (5 * i + 2) % d})
        feats = " ".join(f"{f}:{(i + f) % 7 / 7 + 0.25:.4f}" for f in fids)
        lines.append(f"{labels} {feats}")
    return ("\n".join(lines) + "\n").encode()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _card(url: str, archive: str, files: dict[str, dict]) -> dict:
    return {
        "name": "Tiny",
        "homepage": "http://example.invalid",
        "stats": {},
        "download": {"url": url, "archive": archive, "format": "xc", "files": files},
    }


# ---------------------------------------------------------------------------------------------
# fetch_url: full, resumed, Range ignored
# ---------------------------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 4000  # 1,024,000 bytes, > one read chunk


def test_full_download(served: _Server, tmp_path: Path):
    served.files["/blob.bin"] = PAYLOAD
    out = registry.fetch_url(served.url + "/blob.bin", tmp_path / "blob.bin", show_progress=False)
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "blob.bin.part").exists()
    assert served.requests == [("/blob.bin", None)]


def test_resumed_download_requests_only_the_rest(served: _Server, tmp_path: Path):
    served.files["/blob.bin"] = PAYLOAD
    have = 300_001
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD[:have])
    out = registry.fetch_url(served.url + "/blob.bin", tmp_path / "blob.bin", show_progress=True)
    assert out.read_bytes() == PAYLOAD
    assert served.requests == [("/blob.bin", f"bytes={have}-")]
    assert not (tmp_path / "blob.bin.part").exists()


def test_interrupted_download_keeps_part_and_resumes(served: _Server, tmp_path: Path):
    served.files["/blob.bin"] = PAYLOAD
    served.cut_after = 400_000
    with pytest.raises(XMCError, match="run the same command again"):
        registry.fetch_url(served.url + "/blob.bin", tmp_path / "blob.bin", show_progress=False)
    part = tmp_path / "blob.bin.part"
    assert not (tmp_path / "blob.bin").exists()
    have = part.stat().st_size
    assert 0 < have <= 400_000 and part.read_bytes() == PAYLOAD[:have]
    out = registry.fetch_url(served.url + "/blob.bin", tmp_path / "blob.bin", show_progress=False)
    assert out.read_bytes() == PAYLOAD
    assert served.requests[-1] == ("/blob.bin", f"bytes={have}-")


def test_disk_full_keeps_the_part_file_and_names_it(served: _Server, tmp_path: Path,
                                                    monkeypatch):
    """A write that fails mid-download (ENOSPC) is an OutputError naming the part file, the
    bytes written so far stay, and the next call resumes from them."""
    import builtins
    import errno

    served.files["/blob.bin"] = PAYLOAD
    real_open = builtins.open
    state = {"writes": 0}

    class _Full:
        def __init__(self, fh):
            self._fh = fh

        def write(self, buf):  # the disk fills up 1,000 bytes into the download
            state["writes"] += 1
            self._fh.write(buf[:1000])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._fh.__exit__(*exc)

    def full_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        return _Full(fh) if str(path).endswith(".part") and "b" in mode else fh

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(OutputError, match=r"blob\.bin\.part.*No space left.*resume"):
        registry.fetch_url(served.url + "/blob.bin", tmp_path / "blob.bin", show_progress=False)
    monkeypatch.setattr(builtins, "open", real_open)
    part = tmp_path / "blob.bin.part"
    have = part.stat().st_size
    assert not (tmp_path / "blob.bin").exists() and 0 < have < len(PAYLOAD)
    out = registry.fetch_url(served.url + "/blob.bin", tmp_path / "blob.bin", show_progress=False)
    assert out.read_bytes() == PAYLOAD
    assert served.requests[-1] == ("/blob.bin", f"bytes={have}-")


def test_server_ignoring_range_restarts(tmp_path: Path):
    with _Server({"/blob.bin": PAYLOAD}, honor_range=False) as srv:
        (tmp_path / "blob.bin.part").write_bytes(b"garbage that must not survive")
        out = registry.fetch_url(srv.url + "/blob.bin", tmp_path / "blob.bin", show_progress=False)
        assert out.read_bytes() == PAYLOAD
        assert srv.requests[0][1] == "bytes=29-"


def test_complete_part_file_gets_416_and_restarts(served: _Server, tmp_path: Path):
    served.files["/blob.bin"] = PAYLOAD[:1000]
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD[:1000])
    out = registry.fetch_url(served.url + "/blob.bin", tmp_path / "blob.bin", show_progress=False)
    assert out.read_bytes() == PAYLOAD[:1000]
    assert [r for _, r in served.requests] == ["bytes=1000-", None]


def test_http_error_and_unreachable(served: _Server, tmp_path: Path):
    with pytest.raises(XMCError, match="HTTP 404"):
        registry.fetch_url(served.url + "/missing", tmp_path / "x", show_progress=False)
    with pytest.raises(XMCError, match="cannot connect"):
        registry.fetch_url("http://127.0.0.1:9/x", tmp_path / "y", show_progress=False,
                           timeout=2)


# ---------------------------------------------------------------------------------------------
# download(): extraction and validation against the card
# ---------------------------------------------------------------------------------------------


def test_download_extract_without_validation(served: _Server, tmp_path: Path):
    served.files["/tiny.tar.gz"] = _tar_gz({"tiny/train.txt": b"hello", "tiny/test.txt": b"x"})
    card = _card(served.url + "/tiny.tar.gz", "tar.gz", {})
    folder = registry.download("ignored", tmp_path, card=card, show_progress=False)
    assert folder == tmp_path / "Tiny"
    assert (folder / "tiny" / "train.txt").read_bytes() == b"hello"
    # second call reuses the archive: no new request
    registry.download("ignored", tmp_path, card=card, show_progress=False)
    assert len(served.requests) == 1


def test_download_zip_and_url_override(served: _Server, tmp_path: Path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("Tiny/data.txt", "abc")
    served.files["/mirror/other.zip"] = buf.getvalue()
    card = _card("http://127.0.0.1:9/never-used.tar.gz", "tar.gz", {})
    folder = registry.download("x", tmp_path, card=card, url=served.url + "/mirror/other.zip",
                               show_progress=False)
    assert (folder / "Tiny" / "data.txt").read_text() == "abc"


def test_unsafe_archive_is_refused(served: _Server, tmp_path: Path):
    served.files["/evil.tar.gz"] = _tar_gz({"../escape.txt": b"x"})
    card = _card(served.url + "/evil.tar.gz", "tar.gz", {})
    with pytest.raises(XMCError, match="outside"):
        registry.download("x", tmp_path, card=card, show_progress=False)
    assert not (tmp_path / "escape.txt").exists()


def test_html_instead_of_archive_gives_a_hint(served: _Server, tmp_path: Path):
    served.files["/drive.zip"] = b"<html>confirm download</html>"
    card = _card(served.url + "/drive.zip", "zip", {})
    with pytest.raises(XMCError, match="--url file://"):
        registry.download("x", tmp_path, card=card, show_progress=False)


def test_no_url_known(tmp_path: Path):
    card = _card("", "zip", {})
    with pytest.raises(XMCError, match="--url"):
        registry.download("x", tmp_path, card=card, show_progress=False)


def _needs_load() -> None:
    formats = pytest.importorskip("xmc_toolkit.data.formats")
    if not hasattr(formats, "load"):
        pytest.skip("xmc_toolkit.data.formats.load is not there yet")


def test_download_validates_statistics(served: _Server, tmp_path: Path):
    _needs_load()
    served.files["/tiny.tar.gz"] = _tar_gz({
        "tiny/tiny_train.txt": _xc_text(30, 12, 5),
        "tiny/tiny_test.txt": _xc_text(10, 12, 5),
    })
    files = {
        "train": {"name": "tiny_train.txt", "num_points": 30, "num_features": 12, "num_labels": 5},
        "test": {"name": "tiny_test.txt", "num_points": 10, "num_features": 12, "num_labels": 5},
    }
    card = _card(served.url + "/tiny.tar.gz", "tar.gz", files)
    folder = registry.download("tiny", tmp_path, card=card, show_progress=False)
    assert (folder / "tiny" / "tiny_train.txt").is_file()

    bad = _card(served.url + "/tiny.tar.gz", "tar.gz", {
        "train": {"name": "tiny_train.txt", "num_points": 31, "num_features": 12, "num_labels": 6},
    })
    with pytest.raises(XMCError) as info:
        registry.download("tiny", tmp_path / "b", card=bad, show_progress=False)
    msg = str(info.value)
    assert "num_points expected 31 found 30" in msg and "num_labels expected 6 found 5" in msg

    missing = _card(served.url + "/tiny.tar.gz", "tar.gz", {"train": {"name": "nope.txt"}})
    with pytest.raises(XMCError, match="nope.txt"):
        registry.download("tiny", tmp_path / "c", card=missing, show_progress=False)


def test_download_plain_file_validates(served: _Server, tmp_path: Path):
    _needs_load()
    served.files["/plain_train.txt"] = _xc_text(8, 6, 3)
    card = _card(served.url + "/plain_train.txt", "none", {
        "train": {"name": "plain_train.txt", "num_points": 8, "num_features": 6, "num_labels": 3},
    })
    folder = registry.download("x", tmp_path, card=card, show_progress=False)
    assert (folder / "plain_train.txt").is_file()


# ---------------------------------------------------------------------------------------------
# end to end: the real Bibtex card against the shared Bibtex files, and the CLI
# ---------------------------------------------------------------------------------------------


def _bibtex_zip(train: Path, test: Path) -> bytes:
    """A zip shaped like the repository's Bibtex.zip: one data file with train + test rows."""
    tr = train.read_text().splitlines()
    te = test.read_text().splitlines()
    n_tr, d, l = (int(v) for v in tr[0].split())
    n_te = int(te[0].split()[0])
    text = "\n".join([f"{n_tr + n_te} {d} {l}"] + tr[1:] + te[1:]) + "\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("Bibtex/Bibtex_data.txt", text)
    return buf.getvalue()


def test_bibtex_card_validates_real_files(served: _Server, tmp_path: Path, bibtex_train: Path,
                                          bibtex_test: Path):
    _needs_load()
    served.files["/Bibtex.zip"] = _bibtex_zip(bibtex_train, bibtex_test)
    folder = registry.download("BIBTEX", tmp_path, url=served.url + "/Bibtex.zip",
                               show_progress=False)
    assert (folder / "Bibtex" / "Bibtex_data.txt").is_file()


def test_cli_download(served: _Server, tmp_path: Path):
    from click.testing import CliRunner

    from cli.main import xmc

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("Bibtex/Bibtex_data.txt", "1 3 2\n0 1:0.5\n")
    served.files["/b.zip"] = buf.getvalue()
    runner = CliRunner()
    res = runner.invoke(xmc, ["data", "download", "bibtex", "--dir", str(tmp_path), "--url",
                              served.url + "/b.zip", "--no-progress", "--no-validate"])
    assert res.exit_code == 0, res.output
    assert "Bibtex: ready in" in res.output
    if hasattr(pytest.importorskip("xmc_toolkit.data.formats"), "load"):
        res = runner.invoke(xmc, ["data", "download", "bibtex", "--dir", str(tmp_path),
                                  "--url", served.url + "/b.zip", "--no-progress"])
        assert res.exit_code == 2
        assert "error:" in res.output and "num_points expected 7395 found 1" in res.output
    res = runner.invoke(xmc, ["data", "download", "--list"])
    assert res.exit_code == 0 and "Amazon-3M" in res.output
    res = runner.invoke(xmc, ["data", "download", "nope"])
    assert res.exit_code == 2 and "known data sets" in res.output
