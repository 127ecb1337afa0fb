"""Download, verify and unpack the public datasets into the layout the loaders expect.

    python -m semiseg.data.download NAME [NAME ...]     NAME: mtiles, kosdd2, neu, dagm, or all
        [--data-dir DIR]    default: $SEMISEG_DATA_DIR, else ./data
        [--url URL]         a mirror of the archive (one dataset only)
        [--sha256 HEX]      the archive's expected SHA-256 (one dataset only)
        [--force]           download again even if the dataset folder is already there
        [--keep-archive]    keep the downloaded archive next to the data

Datasets with a direct public URL (``mtiles``, ``kosdd2``) are downloaded with a progress bar, checked,
and unpacked into ``<data dir>/<Name>_data``. Those behind a registration or a cloud-drive page (``neu``,
``dagm``) cannot be fetched by a script: for them the command prints where to get the files and where to
put them.

Checksums: none of these archives has a SHA-256 published by its authors that this project could quote,
so by default the first download's SHA-256 is computed and recorded in ``<data dir>/checksums.json``
(the command says so); every later download of the same URL is checked against that record, and
``--sha256`` checks against a value you trust. A mismatch is an error and nothing is unpacked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from semiseg.errors import SemiSegError, exit_on_user_error

log = logging.getLogger(__name__)

CHECKSUM_FILE = "checksums.json"
CHUNK_BYTES = 1 << 20
USER_AGENT = "semiseg-download/0.1 (+https://github.com/)"


class DownloadError(SemiSegError, OSError):
    """A download failed, or its archive does not match its checksum or expected content."""


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from and how it lands in ``<data dir>/<folder>``.

    Attributes:
        name: the ``dataset=`` name.
        folder: the dataset root under the data dir (the UAPS naming, ``<Name>_data``).
        citation: the work that published the data.
        page: the dataset's web page.
        url: direct URL of its archive, or ``None`` when the files sit behind a registration / cloud drive.
        sha256: the archive's SHA-256 as published by its authors (``None``: none is known).
        markers: names that sit directly in the dataset root; used to find it inside the archive.
        manual: what to do by hand when there is no direct URL.
    """

    name: str
    folder: str
    citation: str
    page: str
    url: str | None
    sha256: str | None
    markers: tuple[str, ...]
    manual: str = ""


SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        Source(
            name="mtiles",
            folder="MTiles_data",
            citation="Huang, Qiu, Yuan: Surface defect saliency of magnetic tile, The Visual Computer 2020",
            page="https://github.com/abin24/Magnetic-tile-defect-datasets.",
            url="https://github.com/abin24/Magnetic-tile-defect-datasets./archive/refs/heads/master.zip",
            sha256=None,
            markers=("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven"),
        ),
        Source(
            name="kosdd2",
            folder="KoSDD2_data",
            citation="Bozic, Tabernik, Skocaj: Mixed supervision for surface-defect detection, Computers in "
            "Industry 2021",
            page="https://www.vicos.si/resources/kolektorsdd2/",
            url="https://go.vicos.si/kolektorsdd2",
            sha256=None,
            markers=("train", "test"),
        ),
        Source(
            name="neu",
            folder="NEU_data",
            citation="Dong, Song et al.: PGA-Net, IEEE Transactions on Industrial Informatics 2020",
            page="the NEU surface defect database pages of K. Song's group, Northeastern University "
            "(faculty.neu.edu.cn), which link NEU-Seg on a cloud drive",
            url=None,
            sha256=None,
            markers=("images", "annotations"),
            manual="download the NEU-Seg archive from the cloud-drive link on that page, unpack it, and arrange it "
            "as {root}/images/{{training,test}}/<id>.jpg and {root}/annotations/{{training,test}}/<id>.png",
        ),
        Source(
            name="dagm",
            folder="DAGM_data",
            citation="Wieler, Hahn: Weakly supervised learning for industrial optical inspection, DAGM 2007",
            page="https://hci.iwr.uni-heidelberg.de/content/weakly-supervised-learning-industrial-optical-inspection",
            url=None,
            sha256=None,
            markers=("Class1",),
            manual="download the archives Class1 ... Class6 (and Class7-10 if wanted) from that page and unpack "
            "each so that {root}/Class<k>/Train/Label/Labels.txt exists",
        ),
    )
}


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically (temporary file and rename); avoids importing the training stack."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(temporary, path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, destination: Path, label: str) -> None:
    """Stream ``url`` into ``destination`` with a progress bar (through a ``.part`` file)."""
    partial = destination.with_name(destination.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (
                TextColumn(label),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
            with Progress(*columns, transient=False) as progress:
                task = progress.add_task(label, total=total)
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    out.write(chunk)
                    progress.update(task, advance=len(chunk))
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"{url}: download failed ({error}); check the network or pass a mirror with --url"
        ) from None
    os.replace(partial, destination)


def check_checksum(archive: Path, url: str, expected: str | None, data_dir: Path) -> str:
    """Compare ``archive``'s SHA-256 with ``expected`` or the recorded value; record it if neither exists."""
    actual = sha256_of(archive)
    record_path = data_dir / CHECKSUM_FILE
    records = json.loads(record_path.read_text()) if record_path.is_file() else {}
    reference, where = (
        (expected, "--sha256 / the published value") if expected else (records.get(url), str(record_path))
    )
    if reference is None:
        records[url] = actual
        write_json(record_path, records)
        print(
            f"note: no published checksum is known for {url}; recorded its SHA-256 {actual} in {record_path} "
            "(later downloads are checked against it)"
        )
    elif actual != reference.lower():
        raise DownloadError(
            f"{archive}: SHA-256 {actual} does not match {reference} ({where}); the download is corrupt or the "
            f"file changed upstream — delete it and retry, or remove the entry from {record_path} if the change "
            "is expected"
        )
    return actual


def _safe_members(names: Sequence[str], archive: Path) -> None:
    for name in names:
        path = Path(name)
        if path.is_absolute() or ".." in path.parts:
            raise DownloadError(f"{archive}: member {name!r} would unpack outside the target folder; not unpacking")


def extract(archive: Path, destination: Path) -> None:
    """Unpack a zip or tar archive into ``destination`` (refusing members that escape it)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            _safe_members(bundle.namelist(), archive)
            bundle.extractall(destination)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            _safe_members(bundle.getnames(), archive)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                bundle.extractall(destination, filter="data")
            else:
                bundle.extractall(destination)
    else:
        raise DownloadError(f"{archive}: neither a zip nor a tar archive; the server sent something else")


def find_root(unpacked: Path, markers: Sequence[str]) -> Path:
    """The shallowest folder under ``unpacked`` that holds every marker."""
    candidates = [unpacked, *sorted((p for p in unpacked.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))]
    for folder in candidates:
        if all((folder / marker).exists() for marker in markers):
            return folder
    raise DownloadError(f"the archive holds no folder with {list(markers)}; it is not the expected dataset")


def instructions(source: Source, target: Path) -> str:
    """What to do by hand for a dataset without a direct URL."""
    return (
        f"{source.name}: no direct download. Get it from {source.page} ({source.citation}); "
        f"{source.manual.format(root=target)}. Then train with paths.data_dir={target.parent} "
        f"(or SEMISEG_DATA_DIR={target.parent})."
    )


def download(
    name: str,
    data_dir: Path,
    url: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    keep_archive: bool = False,
) -> Path:
    """Fetch, verify and unpack dataset ``name`` into ``data_dir``; return its root.

    Raises :class:`DownloadError` on a failed download, a checksum mismatch or an unexpected archive.
    For a dataset without a direct URL (and no ``url`` given), prints the instructions and returns the
    root it expects.
    """
    source = SOURCES[name]
    target = data_dir / source.folder
    if target.is_dir() and any(target.iterdir()) and not force:
        print(f"{name}: already present at {target} (use --force to download again)")
        return target
    url = url or source.url
    if url is None:
        print(instructions(source, target))
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=data_dir) as scratch:
        archive = Path(scratch) / (Path(urllib.parse.urlparse(url).path).name or f"{name}.archive")
        fetch(url, archive, f"{name} ")
        digest = check_checksum(archive, url, sha256 or (source.sha256 if url == source.url else None), data_dir)
        unpacked = Path(scratch) / "unpacked"
        extract(archive, unpacked)
        root = find_root(unpacked, source.markers)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for child in root.iterdir():
            shutil.move(str(child), target / child.name)
        if keep_archive:
            shutil.move(str(archive), data_dir / archive.name)
    print(f"{name}: unpacked into {target} (archive SHA-256 {digest})")
    return target


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m semiseg.data.download", description="Download and unpack the public defect datasets."
    )
    parser.add_argument(
        "names", nargs="+", choices=[*SOURCES, "all"], metavar="NAME", help=f"{', '.join(SOURCES)} or all"
    )
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SEMISEG_DATA_DIR", "data")))
    parser.add_argument("--url", help="a mirror of the archive (one dataset only)")
    parser.add_argument("--sha256", help="expected SHA-256 of the archive (one dataset only)")
    parser.add_argument("--force", action="store_true", help="download again even if the folder exists")
    parser.add_argument("--keep-archive", action="store_true", help="keep the archive in the data dir")
    args = parser.parse_args(argv)
    args.names = list(SOURCES) if "all" in args.names else list(dict.fromkeys(args.names))
    if (args.url or args.sha256) and len(args.names) != 1:
        parser.error("--url and --sha256 apply to one dataset; name exactly one")
    return args


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    for name in args.names:
        download(
            name, args.data_dir, url=args.url, sha256=args.sha256, force=args.force, keep_archive=args.keep_archive
        )


if __name__ == "__main__":
    main(sys.argv[1:])
