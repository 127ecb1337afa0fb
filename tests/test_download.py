"""``python -m semiseg.data.download`` against a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data.make_fake_datasets import make_fake_kosdd2
from semiseg.data.datasets.kosdd2 import KolektorSDD2
from semiseg.data.download import CHECKSUM_FILE, DownloadError, download

ROOT = Path(__file__).resolve().parents[1]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, served folder) of an HTTP server on 127.0.0.1 serving a fake KolektorSDD2 zip."""
    served = tmp_path / "served"
    source = make_fake_kosdd2(tmp_path / "build" / "KolektorSDD2", train=4, test=2, positives=(1, 1))
    served.mkdir()
    with zipfile.ZipFile(served / "KolektorSDD2.zip", "w") as bundle:
        for path in sorted(source.rglob("*.png")):
            bundle.write(path, Path("KolektorSDD2") / path.relative_to(source))
    (served / "notes.txt").write_text("no dataset here")
    with zipfile.ZipFile(served / "evil.zip", "w") as bundle:
        bundle.writestr("../escape.txt", "x")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        thread.join()


def test_download_unpacks_layout_and_records_checksum(server, tmp_path: Path, capsys) -> None:
    base, served = server
    data_dir = tmp_path / "data"
    root = download("kosdd2", data_dir, url=f"{base}/KolektorSDD2.zip")
    assert root == data_dir / "KoSDD2_data" and (root / "train" / "10000_GT.png").is_file()
    assert not list(data_dir.glob(".kosdd2-*")) and not list(data_dir.glob("*.zip"))  # scratch removed
    dataset = KolektorSDD2(root)
    assert len(dataset.train_samples) == 4 and len(dataset.test_samples) == 2
    expected = hashlib.sha256((served / "KolektorSDD2.zip").read_bytes()).hexdigest()
    records = json.loads((data_dir / CHECKSUM_FILE).read_text())
    assert records == {f"{base}/KolektorSDD2.zip": expected}
    assert "no published checksum" in capsys.readouterr().out
    download("kosdd2", data_dir, url=f"{base}/KolektorSDD2.zip")
    assert "already present" in capsys.readouterr().out
    # the archive changes upstream: the recorded checksum catches it, the data stay as they were
    with zipfile.ZipFile(served / "KolektorSDD2.zip", "a") as bundle:
        bundle.writestr("KolektorSDD2/extra.txt", "changed")
    with pytest.raises(DownloadError, match=rf"SHA-256 .* does not match {expected}"):
        download("kosdd2", data_dir, url=f"{base}/KolektorSDD2.zip", force=True)
    assert (root / "train" / "10000.png").is_file() and not (root / "extra.txt").exists()


def test_given_checksum_is_verified(server, tmp_path: Path) -> None:
    base, served = server
    good = hashlib.sha256((served / "KolektorSDD2.zip").read_bytes()).hexdigest()
    with pytest.raises(DownloadError, match="does not match 0000"):
        download("kosdd2", tmp_path / "a", url=f"{base}/KolektorSDD2.zip", sha256="0" * 64)
    assert not (tmp_path / "a" / "KoSDD2_data").exists()
    download("kosdd2", tmp_path / "b", url=f"{base}/KolektorSDD2.zip", sha256=good)
    assert (tmp_path / "b" / "KoSDD2_data" / "test").is_dir()
    assert not (tmp_path / "b" / CHECKSUM_FILE).exists()  # a given checksum is not recorded


def test_bad_archives_and_missing_files(server, tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(DownloadError, match="download failed"):
        download("kosdd2", tmp_path / "a", url=f"{base}/missing.zip")
    with pytest.raises(DownloadError, match="neither a zip nor a tar"):
        download("kosdd2", tmp_path / "b", url=f"{base}/notes.txt")
    with pytest.raises(DownloadError, match="would unpack outside"):
        download("kosdd2", tmp_path / "c", url=f"{base}/evil.zip")
    with pytest.raises(DownloadError, match=r"no folder with \['MT_Blowhole'"):
        download("mtiles", tmp_path / "d", url=f"{base}/KolektorSDD2.zip")
    assert not (tmp_path / "escape.txt").exists()


def test_manual_datasets_print_where_to_get_them(tmp_path: Path, capsys) -> None:
    download("neu", tmp_path)
    download("dagm", tmp_path)
    out = capsys.readouterr().out
    assert "neu: no direct download" in out and f"{tmp_path / 'NEU_data'}/images/{{training,test}}" in out
    assert "hci.iwr.uni-heidelberg.de" in out and f"{tmp_path / 'DAGM_data'}/Class<k>/Train/Label/Labels.txt" in out


def test_command_line(server, tmp_path: Path) -> None:
    base, _ = server
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "semiseg.data.download", "kosdd2", "--data-dir", str(tmp_path)]
    done = subprocess.run([*command, "--url", f"{base}/KolektorSDD2.zip"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "KoSDD2_data" / "train").is_dir() and "unpacked into" in done.stdout
    failed = subprocess.run(
        [*command, "--force", "--url", f"{base}/KolektorSDD2.zip", "--sha256", "1" * 64],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert failed.returncode == 2 and failed.stderr.startswith("error: ") and "does not match" in failed.stderr
