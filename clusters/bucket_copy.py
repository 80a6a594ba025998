"""Copy a file or a folder between a bucket and this machine with what gid-search already installs (pyarrow).

    python clusters/bucket_copy.py SRC DST [--missing-ok]

SRC and DST are local paths or URIs: s3://bucket/prefix, gs://bucket/prefix, file:///abs/path.
Credentials come from the machine (an AWS instance profile, a GCP service account, or the usual
environment variables), so cluster nodes need no cloud CLI. The cluster configs use it to

- copy the sweep's inputs (``data/`` and the teacher / baseline model files under ``runs/``) from
  ``<bucket>/inputs`` into the checkout on every node, so the configs' relative paths resolve the
  same everywhere;
- back up and restore the MLflow server's SQLite database (a ``*.db`` source is copied through
  SQLite's online backup, so a running server's database is copied consistently).

A folder is copied recursively into DST (existing files are overwritten, others kept).
``--missing-ok`` makes a missing SRC a no-op (exit 0) instead of an error (exit 1).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def _sqlite_snapshot(path: str, directory: str) -> str:
    snapshot = str(Path(directory) / Path(path).name)
    source, target = sqlite3.connect(path), sqlite3.connect(snapshot)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    return snapshot


def copy(src: str, dst: str, missing_ok: bool = False) -> bool:
    """Copy ``src`` (file or folder) to ``dst``; False when ``src`` is missing and ``missing_ok``."""
    source_fs, source = resolve(src)
    target_fs, target = resolve(dst)
    info = source_fs.get_file_info(source)
    if info.type == pafs.FileType.NotFound:
        if missing_ok:
            return False
        raise FileNotFoundError(f"{src} does not exist")
    if info.type == pafs.FileType.Directory:
        target_fs.create_dir(target, recursive=True)
        pafs.copy_files(source, target, source_filesystem=source_fs, destination_filesystem=target_fs)
        return True
    parent = target.rsplit("/", 1)[0]
    if parent:
        target_fs.create_dir(parent, recursive=True)
    with tempfile.TemporaryDirectory() as directory:
        if source.endswith(".db") and isinstance(source_fs, pafs.LocalFileSystem):
            source = _sqlite_snapshot(source, directory)
        pafs.copy_files(source, target, source_filesystem=source_fs, destination_filesystem=target_fs)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bucket_copy.py", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="file or folder: local path or URI (s3://, gs://, file://)")
    parser.add_argument("dst", help="where to copy it: local path or URI")
    parser.add_argument("--missing-ok", action="store_true", help="a missing SRC is not an error")
    args = parser.parse_args(argv)
    try:
        copied = copy(args.src, args.dst, args.missing_ok)
    except (OSError, sqlite3.Error) as exc:
        print(f"bucket_copy: error: {exc}", file=sys.stderr)
        return 1
    print(f"copied {args.src} -> {args.dst}" if copied else f"nothing to copy: {args.src} does not exist")
    return 0


if __name__ == "__main__":
    sys.exit(main())
