"""Dataset versions: every ETL run writes a new immutable version and makes it current in one step.

    python -m etl.versions list  /data/nih_512
    python -m etl.versions prune /data/nih_512 [--keep-days 14] [--dry-run]

An ETL --output folder (the dataset root) holds:

    _versions/<ID>/         one ETL run's output: split=*/, _etl_summary.json, _etl_config.yaml, _version.json
                            (id, creation and commit times, the resolved ETL config, rows per split), ...
    _current.json           {"version": ID}: replaced atomically (a new file renamed over it)
    _readers/<RUN_ID>.json  the version each training run resolved, and when it started

A version is written in place and complete once its _version.json exists (written last); only then does
_current.json name it. Nothing is renamed but that small file, so the layout suits object stores too (a
Volume on Databricks), where renaming a folder copies it; where even that file's replacement is not atomic,
a reader that finds no _current.json takes the complete version committed last.

A training run resolves the current version once at its start (:func:`resolve`), reads only that folder
and records its id. Versions are never changed or replaced, only pruned, and a version is kept while it is
current, was current within the last `keep_days` days (a run started then may still read it), or a run
that started within `keep_days` recorded it. A plain dataset folder (the layout before versions) still
reads as it is, with no version id; a versioned ETL over it leaves its files in place until pruned.
Names start with "_" so that Spark and pyarrow, reading the root as a dataset, never list them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

log = logging.getLogger("etl")
VERSIONS = "_versions"
CURRENT = "_current.json"
READERS = "_readers"
VERSION_FILE = "_version.json"
TEMPORARY_MARK = ".tmp-"
LEGACY = "legacy"  # the id listed for the files of a plain (unversioned) dataset folder under a root
DEFAULT_KEEP_DAYS = 14  # two cycles of a weekly training on a nightly ETL
WRITING_ALIVE = timedelta(days=1)  # an incomplete version younger than this may belong to a running ETL


@dataclass(frozen=True)
class Resolved:
    root: Path  # where the dataset's versions and readers are recorded
    path: Path  # the folder to read
    version: str | None  # None: a plain folder without versions


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def resolve(dataset: str | Path) -> Resolved:
    """The folder to read for `dataset`: a root's current version, a version folder itself (pinned), or a
    plain dataset folder."""
    dataset = Path(dataset).resolve()
    version = current_id(dataset)
    if version is not None:
        path = dataset / VERSIONS / version
        if not (path / VERSION_FILE).exists():
            raise FileNotFoundError(f"{dataset / CURRENT} names version {version}, which is not complete in "
                                    f"{path.parent}")
        return Resolved(dataset, path, version)
    if (dataset / VERSION_FILE).exists():  # a version named directly: pinned
        root = dataset.parent.parent if dataset.parent.name == VERSIONS else dataset
        return Resolved(root, dataset, json.loads((dataset / VERSION_FILE).read_text())["id"])
    return Resolved(dataset, dataset, None)


def complete_versions(root: Path) -> list[Path]:
    folder = root / VERSIONS
    return sorted(path for path in folder.iterdir() if (path / VERSION_FILE).exists()) if folder.is_dir() else []


def current_id(root: Path) -> str | None:
    """The version _current.json names; without one, the complete version last made current."""
    if (root / CURRENT).exists():
        return json.loads((root / CURRENT).read_text())["version"]
    infos = [json.loads((path / VERSION_FILE).read_text()) for path in complete_versions(root)]
    made = [info for info in infos if info.get("made_current", True)]
    return max(made, key=lambda info: datetime.fromisoformat(info["committed"]))["id"] if made else None


def has_data(folder: Path) -> bool:
    """A dataset root holding a dataset: a complete version or the files of a plain dataset."""
    return folder.exists() and (current_id(folder) is not None or any(
        not entry.name.startswith((".", VERSIONS, READERS, CURRENT)) for entry in folder.iterdir()))


def new_version(root: Path) -> tuple[str, Path]:
    """A new version id and its folder, not yet created (Spark's writer creates it); complete after
    :func:`commit`."""
    version = now_utc().strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
    (root / VERSIONS).mkdir(parents=True, exist_ok=True)
    return version, root / VERSIONS / version


@contextlib.contextmanager
def writing(root: Path) -> Iterator[tuple[str, Path]]:
    """A new version's id and folder to write, then :func:`commit` inside the block; a block that fails
    removes the folder, so no half-written version is left (one killed outright is pruned as incomplete)."""
    version, folder = new_version(root)
    try:
        yield version, folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def copy_unchanged(source: Path, folder: Path, rewritten: set[str]) -> None:
    """Create `folder`, a version derived from the version `source`, with a copy of every entry of `source`
    but the `rewritten` ones and its seal: the splits left as they are, quarantine, side tables, summaries."""
    folder.mkdir()
    for entry in sorted(source.iterdir()):
        if entry.name not in rewritten | {VERSION_FILE}:
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, folder / entry.name)


def commit(root: Path, version: str, info: dict, make_current: bool = True) -> Path:
    """Seal version `version` (its _version.json written last), then make it current (unless not
    `make_current`: a version kept for inspection that training never picks up)."""
    committed = now_utc().isoformat()
    path = root / VERSIONS / version
    (path / VERSION_FILE).write_text(json.dumps({"id": version, "committed": committed, "made_current": make_current,
                                                **info}, indent=2, default=str))
    if not make_current:
        return path
    pointer = root / f"{CURRENT}{TEMPORARY_MARK}{secrets.token_hex(4)}"
    pointer.write_text(json.dumps({"version": version, "since": committed}))
    try:
        os.replace(pointer, root / CURRENT)  # atomic on a POSIX file system: the old version or the new one
    except OSError:  # a mount without rename (FUSE over object storage): one whole-object write instead
        (root / CURRENT).write_text(pointer.read_text())
        pointer.unlink()
    return path


def record_reader(resolved: Resolved, run_id: str) -> None:
    """Note that run `run_id` reads `resolved`'s version, so pruning keeps it (best effort: a read-only
    dataset still trains, protected by the time it was current)."""
    if resolved.version is None:
        return
    folder = resolved.root / READERS
    try:
        folder.mkdir(exist_ok=True)
        (folder / f"{run_id}.json").write_text(json.dumps(
            {"version": resolved.version, "run_id": run_id, "started": now_utc().isoformat()}))
    except OSError as exc:
        log.warning("could not record run %s as a reader of %s (%s); pruning keeps the version for its "
                    "retention days after it stops being current", run_id, resolved.path, exc)


@dataclass
class Version:
    id: str
    path: Path
    committed: datetime
    info: dict
    current: bool = False
    superseded: datetime | None = None  # when the next version became current
    readers: tuple[str, ...] = ()  # runs that recorded it within the retention window

    def rows(self) -> dict:
        return self.info.get("rows_written", {})


def read_readers(root: Path) -> list[dict]:
    folder = root / READERS
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))] if folder.exists() else []


def list_versions(root: Path, keep_days: float = DEFAULT_KEEP_DAYS, now: datetime | None = None) -> list[Version]:
    """The versions of a root, oldest first, each with whether it is current, when it was superseded and the
    runs within the window that recorded it. A plain dataset's files under the root are listed as 'legacy'."""
    root, now = Path(root).resolve(), now or now_utc()
    current = current_id(root) if root.exists() else None
    versions = []
    for path in complete_versions(root):
        info = json.loads((path / VERSION_FILE).read_text())
        versions.append(Version(info["id"], path, datetime.fromisoformat(info["committed"]), info))
    if any(entry.name.startswith("split=") for entry in root.iterdir()) if root.exists() else False:
        summary = root / "_etl_summary.json"
        stamp = (summary if summary.exists() else root).stat().st_mtime
        versions.append(Version(LEGACY, root, datetime.fromtimestamp(stamp, timezone.utc), {}))
    versions.sort(key=lambda v: v.committed)
    window = now - timedelta(days=keep_days)
    recent = [r for r in read_readers(root) if datetime.fromisoformat(r["started"]) >= window]
    made_current = [version for version in versions if version.info.get("made_current", True)]
    for older, newer in zip(made_current, made_current[1:]):
        older.superseded = newer.committed
    for version in versions:
        version.current = version.id == current or (current is None and version.id == LEGACY)
        version.readers = tuple(r["run_id"] for r in recent if r["version"] == version.id)
    return versions


def keep_reason(version: Version, keep_days: float, now: datetime) -> str | None:
    if version.current:
        return "current"
    if not version.info.get("made_current", True) and version.committed >= now - timedelta(days=keep_days):
        return f"never made current (kept for inspection), written within {keep_days:g} days"
    if version.superseded and version.superseded >= now - timedelta(days=keep_days):
        return f"current until {version.superseded:%Y-%m-%d %H:%M} UTC, within {keep_days:g} days"
    if version.readers:
        return f"read by run(s) {', '.join(version.readers)} started within {keep_days:g} days"
    return None


def prune(root: Path, keep_days: float = DEFAULT_KEEP_DAYS, dry_run: bool = False,
          now: datetime | None = None) -> list[str]:
    """Remove the versions no run started within `keep_days` may read, what ETL runs that died left and reader
    records older than the window; returns the ids removed (or that would be, with `dry_run`)."""
    root, now = Path(root).resolve(), now or now_utc()
    window = now - timedelta(days=keep_days)
    removed = []
    for version in list_versions(root, keep_days, now):
        if keep_reason(version, keep_days, now) is None:
            removed.append(version.id)
            if not dry_run:
                remove_version(root, version)
    if dry_run:
        return removed
    complete = set(complete_versions(root))
    for path in (root / VERSIONS).iterdir() if (root / VERSIONS).is_dir() else []:
        # an ETL that died (one still writing touched its folder within the day)
        if path not in complete and datetime.fromtimestamp(path.stat().st_mtime, timezone.utc) < min(
                window, now - WRITING_ALIVE):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in (root / READERS).glob("*.json") if (root / READERS).exists() else []:
        if datetime.fromisoformat(json.loads(path.read_text())["started"]) < window:
            path.unlink()
    return removed


def remove_version(root: Path, version: Version) -> None:
    if version.id != LEGACY:
        shutil.rmtree(version.path)
        return
    for entry in root.iterdir():  # the plain dataset's files, beside the versions
        if entry.name not in (VERSIONS, CURRENT, READERS):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["list", "prune"])
    parser.add_argument("root", help="the ETL's --output folder")
    parser.add_argument("--keep-days", type=float, default=DEFAULT_KEEP_DAYS,
                        help=f"retention window in days (default {DEFAULT_KEEP_DAYS}): see above")
    parser.add_argument("--dry-run", action="store_true", help="prune: only say what would be removed")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.exists():
        raise SystemExit(f"{root} does not exist: name an ETL --output folder")
    now = now_utc()
    if args.command == "prune":
        removed = prune(root, args.keep_days, args.dry_run, now)
        print(f"{'would remove' if args.dry_run else 'removed'}: {', '.join(removed) or 'nothing'}")
        return
    for version in list_versions(root, args.keep_days, now):
        kept = keep_reason(version, args.keep_days, now) or f"prunable (older than {args.keep_days:g} days)"
        rows = ", ".join(f"{split} {count:,}" for split, count in version.rows().items())
        print(f"{version.id}  committed {version.committed:%Y-%m-%d %H:%M} UTC  {rows or '-'}  [{kept}]")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main()
