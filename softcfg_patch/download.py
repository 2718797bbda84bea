"""softcfg-download: fetch the official weights files, verified and resumable.

    softcfg-download alitok_xl rar_l reference inception --dir weights
    softcfg-download --all --dry-run                     # what would come, from where, how much
    softcfg-download llamagen_xl --mirror /nfs/weights   # offline cluster: copy from a folder
    SOFTCFG_MIRROR=http://host/weights softcfg-download rar_xl   # ... or from an http(s) folder

A name is a config (alitok_xl: the files its config names under the family's checkpoint
keys), a family (rar: all its files) or an evaluation file (reference, reference512,
inception); registry.py says where each file is published and what it must hash to.

Every file arrives as <dir>/<name>.part (an existing .part is resumed with an HTTP Range
request) and is renamed to <dir>/<name> only after its checks: its size when published, and
its SHA-256: pinned (must match), a torch.hub prefix (must start with it), or unpinned
(trust on first use: the first download's hash goes to <dir>/SHA256SUMS, in `sha256sum -c`
format, and binds every later run). A file that fails is moved to <name>.bad. A present file
is verified before it is skipped; <dir>/.softcfg-download.json caches hashes by size and
mtime, so a 12 GB file is not re-read on every call.

Why plain urllib and not huggingface_hub or requests: one code path for every host (Hugging
Face, direct URLs, Google Drive without gdown, http mirrors) gives every file the same
resume, .part and hash checks, with no dependency beyond the standard library. HF_ENDPOINT
and HF_TOKEN are honoured as huggingface_hub does (the token goes to the Hub only, not to the
storage host it redirects to). http(s)_proxy work as for any urllib client.

Failures are one line each (`error: ...`, exit status 2), say what to do, and never cost
finished work: the other files are still fetched. Nothing here imports torch, so it runs on
a login node.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import http.client
import json
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Optional

import yaml
from tqdm import tqdm

from .errors import SoftCFGError
from .run import registry
from .run.config import CONFIG_DIR
from .run.registry import Remote

__all__ = ["DownloadError", "main", "fetch", "fetch_files", "files_for", "every_file", "catalogue",
           "config_file", "sha256_of"]

HF_ENDPOINT = "https://huggingface.co"  # the default of $HF_ENDPOINT
# Drive's direct endpoint; confirm=t skips the "can't scan this file for viruses" page of big files.
DRIVE_URL = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
SUMS = "SHA256SUMS"
CACHE = ".softcfg-download.json"
CHUNK = 1 << 20
TIMEOUT_S = 60              # per socket operation: a stalled transfer fails instead of hanging
HASH_BAR_BYTES = 256 << 20  # hashing a present file larger than this shows a bar
USER_AGENT = "softcfg-download"


class DownloadError(SoftCFGError):
    """A file could not be fetched or verified; the message says why and what to do.
    `failures`: the one-line messages of every failed file, when several were requested."""

    def __init__(self, message: str, failures: Iterable[str] = ()):
        super().__init__(message)
        self.failures = list(failures)


# ----------------------------------------------------------------------------------------------
# Names -> files

def config_file(name: str) -> Path:
    """The config file of config `name`: the packaged configs (a checkout's configs/, or the wheel's)."""
    return CONFIG_DIR / f"{name}.yaml"


def config_remotes(name: str) -> list[Remote]:
    """The published files config `name` reads: the file names under its family's checkpoint keys."""
    path = config_file(name)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise DownloadError(f"cannot read the config of {name}: {path} ({err.strerror})") from None
    remotes = []
    for checkpoint in registry.get(name).checkpoints:
        value = _dotted(config, checkpoint.key)
        if value is None:
            continue
        remote = registry.published(os.path.basename(str(value)))
        if remote is None:
            raise DownloadError(f"{path} sets {checkpoint.key}: {value}, which is no file the registry "
                                f"publishes; get it from {checkpoint.source}")
        remotes.append(remote)
    return remotes


def _dotted(config: dict, key: str) -> Optional[str]:
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def catalogue() -> dict[str, list[Remote]]:
    """Every name the command line takes -> its files: configs, families, evaluation files.
    (Tests replace this function with their own small registry.)"""
    names = {name: config_remotes(name) for name in registry.model_names()}
    names.update({family.name: list(family.downloads) for family in registry.MODELS.values()})
    names.update({key: [remote] for key, remote in registry.EVALUATION_DOWNLOADS.items()})
    # and every file by its own name (what a sampler's "not found" error suggests)
    names.update({remote.name: [remote] for remotes in list(names.values()) for remote in remotes})
    return names


def files_for(names: Iterable[str]) -> list[Remote]:
    """The files of `names` (config, family or evaluation names), each file once, in order."""
    names, known = list(names), catalogue()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise DownloadError(f"unknown name{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                            f"valid names: {', '.join(known)} (or --all)")
    return _unique(remote for name in names for remote in known[name])


def command_for(path: str) -> Optional[str]:
    """The command that fetches a missing checkpoint `path`: by the one config naming it when
    there is one (that also fetches the config's other files), else by its file name."""
    name = os.path.basename(path)
    if registry.published(name) is None:
        return None
    configs = [c for c in registry.model_names() if any(r.name == name for r in config_remotes(c))]
    return f"softcfg-download {configs[0] if len(configs) == 1 else name} --dir {os.path.dirname(path) or '.'}"


def every_file() -> list[Remote]:
    """--all: every file of every family and every evaluation file, each once."""
    return _unique(remote for remotes in catalogue().values() for remote in remotes)


def _unique(remotes: Iterable[Remote]) -> list[Remote]:
    out = {}  # AliTok.pth is named by three configs: fetch it once
    for remote in remotes:
        out.setdefault(remote.name, remote)
    return list(out.values())


# ----------------------------------------------------------------------------------------------
# The folder's memory: SHA256SUMS and the hash cache

def sha256_of(path: Path) -> str:
    """SHA-256 of a file, read in chunks (with a bar for big files)."""
    return _digest(path).hexdigest()


def _digest(path: Path, limit: Optional[int] = None) -> "hashlib._Hash":
    """The running SHA-256 of the first `limit` bytes of `path` (all of it: None)."""
    digest, left = hashlib.sha256(), limit if limit is not None else path.stat().st_size
    with open(path, "rb") as f, tqdm(total=left, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"hashing {path.name}", leave=False,
                                     disable=left < HASH_BAR_BYTES) as bar:
        while left > 0 and (block := f.read(min(CHUNK, left))):
            digest.update(block)
            left -= len(block)
            bar.update(len(block))
    return digest


@dataclass
class Ledger:
    """What --dir remembers: SHA256SUMS (the hash of every verified file, `sha256sum -c`
    format) and the cache {name: {size, mtime_ns, sha256}} of hashes of present files."""
    dest: Path
    sums: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    foreign: list = field(default_factory=list)  # SHA256SUMS lines not ours to parse: kept as they are

    @classmethod
    def load(cls, dest: Path) -> "Ledger":
        ledger = cls(dest)
        if (dest / SUMS).is_file():
            for line in (dest / SUMS).read_text().splitlines():
                if len(line) > 66 and line[64] == " " and line[65] in " *":  # "<hash>  name" or "<hash> *name"
                    ledger.sums[line[66:]] = line[:64].lower()
                elif line.strip():
                    ledger.foreign.append(line)
        try:
            ledger.cache = json.loads((dest / CACHE).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache or a broken one: it is only a cache, files get hashed again
        return ledger

    def hash_of(self, path: Path) -> str:
        """The SHA-256 of present file `path`: from the cache if its size and mtime match."""
        stat, entry = path.stat(), self.cache.get(path.name, {})
        if entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry["sha256"]
        digest = sha256_of(path)
        self.remember(path, digest)
        return digest

    def remember(self, path: Path, digest: str) -> None:
        stat = path.stat()
        self.cache[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}

    def record(self, name: str, digest: str) -> bool:
        """Put `name`'s verified hash in SHA256SUMS; True if it was not there before."""
        new = name not in self.sums
        self.sums[name] = digest
        return new

    def save(self) -> None:
        lines = self.foreign + [f"{digest}  {name}" for name, digest in self.sums.items()]
        _write_atomic(self.dest / SUMS, "".join(f"{line}\n" for line in lines))
        _write_atomic(self.dest / CACHE, json.dumps({"files": self.cache}, indent=1))


def _write_atomic(path: Path, text: str) -> None:
    """Write then rename: a killed run never leaves half a SHA256SUMS. (Not files.atomic_write:
    that module imports numpy, which would double this command's start-up time.)"""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open(): the umask's mode, readable by the group
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Checks

def problem(remote: Remote, size: int, digest: Optional[str], recorded: Optional[str]) -> Optional[str]:
    """Why a file of `size` bytes and SHA-256 `digest` is not `remote` (None: it passes).
    `digest` None: only the size is checked. The community hash (expected_sha256) never fails."""
    if remote.size and size != remote.size:
        return f"its size is {size} bytes, expected {remote.size}"
    if digest is None:
        return None
    if remote.sha256 and digest != remote.sha256:
        return f"its SHA-256 is {digest}, expected {remote.sha256} (pinned in the registry)"
    if remote.sha256_prefix and not digest.startswith(remote.sha256_prefix):
        return f"its SHA-256 is {digest}, expected one starting with {remote.sha256_prefix} (the publisher's prefix)"
    if not remote.sha256 and recorded and digest != recorded:
        return (f"its SHA-256 is {digest}, expected {recorded} (recorded in {SUMS} at its first download; "
                f"if the publisher changed the file, delete that line)")
    return None


def reject(path: Path, remote: Remote, why: str, what: str) -> DownloadError:
    """Move a file that failed its checks to <name>.bad: it never stays under its final name."""
    bad = path.with_name(remote.name + ".bad")
    os.replace(path, bad)
    return DownloadError(f"{remote.name} ({what}) is not the published file: {why}; moved it to {bad}; "
                         f"rerun to download it again")


def pin_kind(remote: Remote) -> str:
    if remote.sha256:
        return "pinned"
    if remote.sha256_prefix:
        return f"prefix {remote.sha256_prefix}"
    return "unpinned" + (" (community hash known)" if remote.expected_sha256 else "")


# ----------------------------------------------------------------------------------------------
# Fetching

def fetch(names: list[str], dest: Path, *, mirror: Optional[str] = None, dry_run: bool = False) -> list[Path]:
    """Fetch (or with dry_run list) the files of `names` into `dest`; see fetch_files."""
    return fetch_files(files_for(names), dest, mirror=mirror, dry_run=dry_run)


def fetch_files(remotes: list[Remote], dest: Path, *, mirror: Optional[str] = None,
                dry_run: bool = False) -> list[Path]:
    """Bring every file of `remotes` to `dest`, verified; returns their paths (dry_run: prints
    the plan, fetches nothing, returns the paths of the files already present and verified).
    `mirror` (default $SOFTCFG_MIRROR): an http(s) or local folder holding the files by name.
    Raises DownloadError after trying every file if any failed; the others stay."""
    dest, mirror = Path(dest), mirror or os.environ.get("SOFTCFG_MIRROR") or None
    check_dir(dest, writable=not dry_run)  # before any network access
    check_mirror(mirror)
    ledger = Ledger.load(dest)
    if dry_run:
        return report_plan(remotes, dest, ledger, mirror)
    done, failures = [], []
    missing = [r for r in remotes if not (dest / r.name).exists()]
    with Progress(sum(max(r.size - _part_size(dest, r), 0) for r in missing), shown=bool(missing)) as progress:
        for remote in remotes:
            try:
                done.append(fetch_one(remote, dest, ledger, mirror, progress))
            except DownloadError as err:
                failures.append(str(err))
                if len(remotes) > 1:
                    say(f"{remote.name}: failed (reported at the end); going on with the others")
    if len(failures) == 1:
        raise DownloadError(failures[0])
    if failures:
        raise DownloadError(f"{len(failures)} of {len(remotes)} files failed (above); the others are in {dest}",
                            failures)
    return done


def check_dir(dest: Path, writable: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"--dir {dest} is a file, not a folder; pass the folder the weights go in")
    if not writable:
        return
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create --dir {dest}: {err.strerror}; pass a folder you can write") from None
    if not os.access(dest, os.W_OK | os.X_OK):
        raise DownloadError(f"--dir {dest} is not writable; pass a folder you can write")


def check_mirror(mirror: Optional[str]) -> None:
    if mirror and not _is_url(mirror) and not _local(mirror).is_dir():
        raise DownloadError(f"mirror folder {_local(mirror)} does not exist (--mirror / SOFTCFG_MIRROR)")


def fetch_one(remote: Remote, dest: Path, ledger: Ledger, mirror: Optional[str], progress: "Progress") -> Path:
    final = dest / remote.name
    if final.exists():
        return keep_present(remote, final, ledger)
    source = source_of(remote, mirror)
    part = dest / (remote.name + ".part")
    say(f"{remote.name}: fetching from {remote.page if source.kind == 'gdown' else source.where}")
    digest = transfer(remote, source, part, progress)
    return settle(remote, part, final, digest, ledger, source)


def keep_present(remote: Remote, final: Path, ledger: Ledger) -> Path:
    """Verify a file already in --dir (cached hash if unchanged); a failing one goes to .bad."""
    recorded = ledger.sums.get(remote.name)
    why = problem(remote, final.stat().st_size, None, recorded)  # a wrong size needs no hashing
    digest = None if why else ledger.hash_of(final)
    why = why or problem(remote, final.stat().st_size, digest, recorded)
    if why:
        ledger.cache.pop(remote.name, None)
        ledger.save()
        raise reject(final, remote, why, f"present in {final.parent}")
    new = ledger.record(remote.name, digest)
    ledger.save()
    if new and not (remote.sha256 or remote.sha256_prefix):
        say(f"{remote.name}: unpinned (no published hash); recorded the present file's SHA-256 "
            f"{digest} in {ledger.dest / SUMS}")
    say(f"{remote.name}: present, verified")
    return final


def settle(remote: Remote, part: Path, final: Path, digest: str, ledger: Ledger, source: "Source") -> Path:
    """Check a complete .part; rename it to its final name only if it passes."""
    why = problem(remote, part.stat().st_size, digest, ledger.sums.get(remote.name))
    if why:
        raise reject(part, remote, why, f"downloaded from {source.where}")
    os.replace(part, final)
    ledger.remember(final, digest)
    new = ledger.record(remote.name, digest)
    ledger.save()
    if new and not (remote.sha256 or remote.sha256_prefix):
        say(f"{remote.name}: unpinned (no published hash); recorded its SHA-256 {digest} in "
            f"{ledger.dest / SUMS}; later runs must match it")
    if remote.expected_sha256 and digest != remote.expected_sha256:
        tqdm.write(f"warning: {remote.name}: SHA-256 {digest} is not the hash of the community mirror "
                   f"({remote.expected_sha256}); it may still be right (the publisher gives none); kept",
                   file=sys.stderr)
    say(f"{remote.name}: done, {final.stat().st_size} bytes, verified ({pin_kind(remote)})")
    return final


@dataclass(frozen=True)
class Source:
    """Where one file comes from: kind "http" (a URL), "file" (a path) or "gdown" (a Drive id)."""
    kind: str
    where: str
    hub: bool = False     # the Hugging Face Hub: send HF_TOKEN, mention it on 401/403
    drive: bool = False   # Google Drive: an HTML page or a 403 means it refused (rate limit)
    mirror: bool = False


def source_of(remote: Remote, mirror: Optional[str]) -> Source:
    if mirror:
        if _is_url(mirror):
            return Source("http", f"{mirror.rstrip('/')}/{urllib.parse.quote(remote.name)}", mirror=True)
        return Source("file", str(_local(mirror) / remote.name), mirror=True)
    if remote.host == "hf":
        cached = hub_cache(remote)
        if cached is not None:  # already in the Hugging Face cache: copied, with the same checks
            return Source("file", cached)
        endpoint = os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/")
        return Source("http", f"{endpoint}/{remote.location}/resolve/{remote.revision}/"
                              f"{urllib.parse.quote(remote.name)}", hub=True)
    if remote.host == "gdrive":
        if _gdown() is not None:
            return Source("gdown", remote.location, drive=True)
        return Source("http", DRIVE_URL.format(id=remote.location), drive=True)
    if remote.host == "url":
        return Source("http", remote.location)
    raise DownloadError(f"{remote.name}: unknown host {remote.host!r} in the registry (hf, gdrive or url)")


def hub_cache(remote: Remote) -> Optional[str]:
    """The file's copy in the Hugging Face cache (HF_HOME, HF_HUB_CACHE), if huggingface_hub is
    installed and holds it: a file fetched once by any tool is not downloaded again."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(remote.location, remote.name, revision=remote.revision)
    except Exception:  # noqa: BLE001 - a broken cache is only a cache: download instead
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


def _is_url(mirror: str) -> bool:
    return mirror.startswith(("http://", "https://"))


def _local(mirror: str) -> Path:
    return Path(mirror.removeprefix("file://")).expanduser()


def _gdown():
    """The gdown module if installed (it follows Drive's confirmation pages), else None."""
    try:
        import gdown
    except ImportError:
        return None
    return gdown


def transfer(remote: Remote, source: Source, part: Path, progress: "Progress") -> str:
    """Bring the whole file to `part`, resuming what is there; returns its SHA-256."""
    offset = part.stat().st_size if part.exists() else 0
    if source.kind == "gdown" and offset:
        # gdown treats an existing output as finished; a .part of ours is half a file: resume it here
        source = Source("http", DRIVE_URL.format(id=remote.location), drive=True)
    if source.kind == "gdown":
        return via_gdown(remote, source, part, progress)
    if remote.size and offset > remote.size:
        offset = 0  # longer than the file: not a prefix of it
    need_space(part, remote.size - offset if remote.size else 0, remote)
    if remote.size and offset == remote.size:
        return _digest(part).hexdigest()  # complete already (interrupted before its check)
    stream, start, total = open_http(remote, source, offset) if source.kind == "http" else open_file(remote, source, offset)
    if stream is None:
        return _digest(part).hexdigest()  # 416: the server has nothing past the .part's end
    if start < offset:
        say(f"{remote.name}: the source cannot resume the .part (no Range support); restarting from zero")
        if remote.size:
            progress.expect(offset)  # those bytes were left out of the total as already here
    if total and not remote.size:
        progress.expect(total - start)
    digest = _digest(part, start) if start else hashlib.sha256()
    with stream:
        receive(stream, part, start, total, digest, progress, remote, source)
    return digest.hexdigest()


def open_http(remote: Remote, source: Source, offset: int) -> tuple:
    """GET `source.where` from byte `offset`: (response, start byte, total bytes or None);
    start is 0 when the server ignores Range (200). (None, offset, offset) on 416."""
    request = urllib.request.Request(source.where, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")  # kept across redirects
    if source.hub and os.environ.get("HF_TOKEN"):
        # Unredirected: the Hub redirects to a storage host that must not see the token.
        request.add_unredirected_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            return None, offset, offset
        raise http_error(err.code, remote, source) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot reach {urllib.parse.urlsplit(source.where).netloc} for {remote.name} "
                            f"({reason}); no network here? use --mirror DIR_OR_URL (or SOFTCFG_MIRROR) "
                            f"with a folder holding the files, fetched where there is network") from None
    if response.headers.get_content_type() == "text/html":
        response.close()
        raise page_error(remote, source)
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if response.status == 206:
        if not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            response.close()
            raise DownloadError(f"{source.where} sent another byte range than asked for {remote.name}; "
                                f"delete {remote.name}.part and rerun")
        return response, offset, offset + length if length is not None else None
    return response, 0, length


def open_file(remote: Remote, source: Source, offset: int) -> tuple:
    """A mirror folder's copy of the file, opened at `offset`: (file, start, size)."""
    path = Path(source.where)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DownloadError(f"{remote.name} is not in the mirror: {path} does not exist; copy it there "
                            f"(from {remote.page}) or drop --mirror") from None
    except OSError as err:
        raise DownloadError(f"cannot read {path}: {err.strerror}") from None
    size = os.fstat(f.fileno()).st_size
    start = offset if offset <= size else 0
    f.seek(start)
    return f, start, size


def http_error(code: int, remote: Remote, source: Source) -> DownloadError:
    where = f"HTTP {code} from {source.where}"
    if source.drive and code in (403, 429):
        return drive_refused(remote)
    if code in (401, 403) and source.hub:
        return DownloadError(f"{where}: access denied; set HF_TOKEN to a token of an account that can read "
                             f"{remote.location} (https://huggingface.co/settings/tokens; for a gated repo accept "
                             f"its terms on {remote.page} first)")
    if code in (401, 403):
        return DownloadError(f"{where}: access denied; download {remote.name} by hand from {remote.page}")
    if code == 404:
        fix = "copy it into the mirror" if source.mirror else f"download it by hand from {remote.page}"
        return DownloadError(f"{where}: {remote.name} is not there; {fix}")
    if code == 429 or code >= 500:
        return DownloadError(f"{where}: the server is failing or busy; try again later, or use --mirror")
    return DownloadError(f"{where}; download {remote.name} by hand from {remote.page}")


def page_error(remote: Remote, source: Source) -> DownloadError:
    if source.drive:
        return drive_refused(remote)
    login = "; for a gated Hugging Face repo accept its terms and set HF_TOKEN" if source.hub else ""
    return DownloadError(f"{source.where} sent an HTML page instead of {remote.name} (a login, error or consent "
                         f"page); download it by hand from {remote.page}{login}")


def drive_refused(remote: Remote) -> DownloadError:
    return DownloadError(f"Google Drive refused {remote.name} (rate-limited: too many downloads of this file "
                         f"lately, or a quota page); try again later, or download it by hand from {remote.page}")


def _looks_like_html(block: bytes) -> bool:
    head = block[:64].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def receive(stream: BinaryIO, part: Path, start: int, total: Optional[int], digest, progress: "Progress",
            remote: Remote, source: Source) -> None:
    """Copy `stream` onto `part` from byte `start`, hashing as it goes; a short stream fails."""
    got = start
    block = _read(stream, remote, source, got, total, part)
    if start == 0 and _looks_like_html(block):  # a page served as a file: never written as one
        raise page_error(remote, source)
    with _open_part(part, start) as out, progress.file_bar(remote.name, total, start) as bar:
        while block:
            try:
                out.write(block)
            except OSError as err:
                raise write_error(err, part, remote, total, got) from None
            digest.update(block)
            got += len(block)
            bar.update(len(block))
            progress.update(len(block))
            block = _read(stream, remote, source, got, total, part)
    if total is not None and got < total:
        raise dropped(remote, source, got, total, part, "the connection closed early")


def _open_part(part: Path, start: int) -> BinaryIO:
    """The .part opened for writing at `start` (0: truncated, else appended: start is its size)."""
    return open(part, "ab" if start else "wb")


def _read(stream: BinaryIO, remote: Remote, source: Source, got: int, total: Optional[int], part: Path) -> bytes:
    try:
        return stream.read(CHUNK)
    except (OSError, http.client.HTTPException) as err:
        raise dropped(remote, source, got, total, part, f"{type(err).__name__}: {err}") from None


def dropped(remote: Remote, source: Source, got: int, total: Optional[int], part: Path, why: str) -> DownloadError:
    of = f" of {total}" if total is not None else ""
    return DownloadError(f"transfer of {remote.name} from {source.where} broke after {got}{of} bytes ({why}); "
                         f"{part} is kept: rerun the same command to resume")


def write_error(err: OSError, part: Path, remote: Remote, total: Optional[int], got: int) -> DownloadError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = f"{total - got} more bytes" if total is not None else "more space (its size is unknown)"
        return DownloadError(f"disk full writing {part}: {remote.name} needs {needed}, "
                             f"{_free_bytes(part.parent)} bytes are free; free some and rerun the same command to resume")
    return DownloadError(f"cannot write {part}: {err.strerror}")


def need_space(part: Path, needed: int, remote: Remote) -> None:
    free = _free_bytes(part.parent)
    if needed > free:
        raise DownloadError(f"not enough space in {part.parent} for {remote.name}: it needs {needed} more bytes, "
                            f"{free} are free")


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def via_gdown(remote: Remote, source: Source, part: Path, progress: "Progress") -> str:
    """A fresh Drive download through gdown (its own bar; it resumes its own partial files)."""
    gdown = _gdown()
    try:
        gdown.download(id=source.where, output=str(part), quiet=False, resume=True)
    except OSError as err:  # requests' errors are OSErrors too
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise write_error(err, part, remote, None, 0) from None
        raise DownloadError(f"gdown could not fetch {remote.name} ({type(err).__name__}: {err}); rerun the "
                            f"same command to resume, or download it by hand from {remote.page}") from None
    except Exception as err:  # gdown's own errors, whose module path moved between versions
        if type(err).__name__ == "FileURLRetrievalError":  # Drive sent its refusal page
            raise drive_refused(remote) from None
        first = str(err).strip().splitlines()[:1]
        raise DownloadError(f"gdown could not fetch {remote.name} ({type(err).__name__}: {' '.join(first)}); "
                            f"download it by hand from {remote.page}") from None
    with open(part, "rb") as f:
        if _looks_like_html(f.read(64)):
            part.unlink()
            raise drive_refused(remote)
    progress.update(part.stat().st_size)
    return sha256_of(part)


def _part_size(dest: Path, remote: Remote) -> int:
    part = dest / (remote.name + ".part")
    return part.stat().st_size if part.exists() else 0


# ----------------------------------------------------------------------------------------------
# Output

def say(message: str) -> None:
    tqdm.write(message)  # above the progress bars, not through them


class Progress:
    """One bar for the bytes of the whole command, and one per file."""

    def __init__(self, total: int, shown: bool = True):
        self.bar = tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc="total",
                        disable=not shown)

    def expect(self, more: int) -> None:
        """A file of unpublished size announced its length, or a resume restarted: more to come."""
        self.bar.total = (self.bar.total or 0) + more
        self.bar.refresh()

    def update(self, n: int) -> None:
        self.bar.update(n)

    def file_bar(self, name: str, total: Optional[int], start: int) -> tqdm:
        return tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=name, leave=False)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def report_plan(remotes: list[Remote], dest: Path, ledger: Ledger, mirror: Optional[str]) -> list[Path]:
    """--dry-run: one line per file and the bytes to fetch; reads --dir, writes nothing."""
    present, to_fetch, unknown = [], 0, 0
    width = max((len(r.name) for r in remotes), default=0)
    for remote in remotes:
        source = source_of(remote, mirror)
        where = remote.page if source.kind == "gdown" or source.drive else source.where
        state = plan_state(remote, dest, ledger)
        if state == "present, verified":
            present.append(dest / remote.name)
        elif remote.size:
            to_fetch += remote.size - _part_size(dest, remote)
        else:
            unknown += 1
        size = f"{remote.size} bytes ({_human(remote.size)})" if remote.size else "size unknown"
        host = "mirror" if mirror else remote.host
        print(f"{remote.name:<{width}}  {host:<6}  {size}  {pin_kind(remote)}  {state}  {where}")
    count = len(remotes) - len(present)
    also = f", plus {unknown} file{'s' * (unknown != 1)} of unknown size" if unknown else ""
    print(f"{len(remotes)} files; {len(present)} present and verified; to fetch: {count} file{'s' * (count != 1)}, "
          f"{to_fetch} bytes ({_human(to_fetch)}){also}; into {dest}")
    return present


def plan_state(remote: Remote, dest: Path, ledger: Ledger) -> str:
    final, part = dest / remote.name, dest / (remote.name + ".part")
    if final.exists():
        recorded = ledger.sums.get(remote.name)
        why = problem(remote, final.stat().st_size, None, recorded)
        why = why or problem(remote, final.stat().st_size, ledger.hash_of(final), recorded)
        return f"present, FAILS its check ({why}): would be moved to .bad" if why else "present, verified"
    if part.exists():
        return f"to fetch (resumes after {part.stat().st_size} bytes)"
    return "to fetch"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


# ----------------------------------------------------------------------------------------------
# Command line

HELP = f"""\
names: a config (alitok_b ... llamagen_3b: the files its configs/<name>.yaml names under the
family's checkpoint keys), a family (alitok, rar, llamagen: all its files), or an evaluation
file (reference: VIRTUAL_imagenet256_labeled.npz, reference512, inception). --all: everything.

Each file goes to DIR/<name>.part first; rerunning the same command resumes it (HTTP Range).
It gets its final name only after its checks: its size where published, and its SHA-256:
pinned (must match), a hash prefix (must start with it), or unpinned (trust on first use:
the first download's hash is recorded in DIR/{SUMS}, and later runs must match it;
`cd DIR && sha256sum -c {SUMS}` checks everything). A file that fails is moved to <name>.bad.
Present files are verified and skipped; DIR/{CACHE} caches their hashes by size and mtime.

Hosts: Hugging Face ($HF_ENDPOINT, default {HF_ENDPOINT}; $HF_TOKEN for gated repos), direct
URLs, Google Drive (through gdown if installed; Drive rate-limits popular files: then the
manual link is printed). Offline clusters: --mirror (or $SOFTCFG_MIRROR) = an http(s) URL or
a local/NFS folder holding the files by name, e.g. a DIR filled on a machine with network.

Exit status: 0 all files present and verified, 2 any failure (each one line; the other files
are still fetched and stay), 130 interrupted (the .part files stay)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softcfg-download", description="Fetch the official weights and evaluation files, verified and resumable.",
        epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="configs, families or evaluation files (see below)")
    parser.add_argument("--all", action="store_true", help="every file of every family and every evaluation file")
    parser.add_argument("--dir", default="weights", type=Path, help="folder the files go in (default: weights)")
    parser.add_argument("--mirror", metavar="URL_OR_DIR", default=None,
                        help="fetch every file as URL_OR_DIR/<name> instead (default: $SOFTCFG_MIRROR)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list each file (host, source, size, pinning, present or to fetch) and the bytes to "
                             "fetch; fetch nothing")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.names and not args.all:
            parser.error("name the files to fetch (e.g. alitok_xl reference inception), or pass --all")
    except SystemExit as exit:  # --help, or a usage error (printed by argparse)
        return int(exit.code or 0)
    try:
        remotes = every_file() if args.all else files_for(args.names)
        fetch_files(remotes, args.dir, mirror=args.mirror, dry_run=args.dry_run)
    except SoftCFGError as err:
        for failure in getattr(err, "failures", ()):
            print(f"error: {failure}", file=sys.stderr)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the .part files stay; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def command() -> None:
    """The `softcfg-download` console script."""
    sys.exit(main())


if __name__ == "__main__":
    command()
