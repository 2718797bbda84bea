"""softcfg-download (softcfg_patch/download.py), against a local threaded HTTP server: no internet.

A small test registry replaces `download.catalogue`: files of a few KB with their real hashes,
pinned, prefix-only, unpinned and community-hash-only, on routes that honour or ignore Range,
drop the connection, or answer an HTML page, 404 or 500.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from download_server import FileServer

from softcfg_patch import download
from softcfg_patch.run import registry
from softcfg_patch.run.registry import Remote

ROOT = Path(__file__).resolve().parents[1]
SIZE = 6000


def body(seed: int, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Files:
    """The test registry: name on the command line -> Remote, its bytes and its server route."""

    def __init__(self, server: FileServer):
        self.server, self.remotes, self.bodies, self.routes = server, {}, {}, {}

    def hf(self, key, name, data, mode="range", **pins) -> None:
        self._add(key, Remote(name, "hf", "org/repo", **pins), f"/org/repo/resolve/main/{name}", data, mode)

    def url(self, key, name, data, mode="range", content_type="application/octet-stream", **pins) -> None:
        path = f"/files/{name}"
        self._add(key, Remote(name, "url", self.server.url(path), **pins), path, data, mode, content_type)

    def _add(self, key, remote, path, data, mode, content_type="application/octet-stream") -> None:
        self.server.add(path, data, mode, content_type)
        self.remotes[key], self.bodies[remote.name], self.routes[remote.name] = remote, data, path

    def hits(self, name: str) -> list:
        return self.server.hits(self.routes[name])


@pytest.fixture
def server():
    server = FileServer().start()
    yield server
    server.stop()


@pytest.fixture
def files(server, monkeypatch):
    f = Files(server)
    a, b, c, d, e = body(1), body(2), body(3), body(4), body(5)
    f.hf("pinned", "pinned.bin", a, sha256=sha(a), size=len(a))
    f.hf("unpinned", "unpinned.bin", b)
    f.hf("wrong", "wrong.bin", c, sha256=sha(b"something else"))
    f.hf("gated", "gated.bin", c, mode="401")
    f.url("prefix", "prefix.pth", d, sha256_prefix=sha(d)[:8])
    f.url("community", "community.npz", e, size=len(e), expected_sha256="0" * 64)
    f.url("norange", "norange.bin", a, mode="norange", sha256=sha(a))
    f.url("drop", "drop.bin", b, mode="drop_once", sha256=sha(b), size=len(b))
    f.url("page", "page.bin", "<!DOCTYPE html><html><body>Sign in</body></html>", content_type="text/html")
    f.url("missing", "missing.bin", b"", mode="404")
    f.url("broken", "broken.bin", b"", mode="500")
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("SOFTCFG_MIRROR", raising=False)
    monkeypatch.setattr(download, "catalogue", lambda: {key: [r] for key, r in f.remotes.items()})
    return f


def run(capsys, *argv) -> tuple[int, str, list[str]]:
    """main(argv): (exit status, stdout + stderr, the `error:` lines)."""
    rc = download.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out + out.err, [line for line in out.err.splitlines() if line.startswith("error:")]


def test_fresh_download_is_verified_and_recorded(files, tmp_path, capsys):
    rc, _, errors = run(capsys, "pinned", "--dir", tmp_path)
    assert (rc, errors) == (0, [])
    assert (tmp_path / "pinned.bin").read_bytes() == files.bodies["pinned.bin"]
    assert not (tmp_path / "pinned.bin.part").exists()
    line = f"{sha(files.bodies['pinned.bin'])}  pinned.bin\n"
    assert (tmp_path / "SHA256SUMS").read_text() == line
    cache = json.loads((tmp_path / ".softcfg-download.json").read_text())["files"]
    assert cache["pinned.bin"]["sha256"] == sha(files.bodies["pinned.bin"])
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_fetch_api_returns_paths(files, tmp_path, capsys):
    assert download.fetch(["pinned", "prefix"], tmp_path) == [tmp_path / "pinned.bin", tmp_path / "prefix.pth"]
    assert (tmp_path / "prefix.pth").read_bytes() == files.bodies["prefix.pth"]


def test_present_file_is_skipped_without_a_request(files, tmp_path, capsys):
    assert run(capsys, "pinned", "--dir", tmp_path)[0] == 0
    rc, out, _ = run(capsys, "pinned", "--dir", tmp_path)
    assert rc == 0 and "present, verified" in out
    assert len(files.hits("pinned.bin")) == 1


def test_resume_requests_only_the_rest(files, tmp_path, capsys):
    data = files.bodies["pinned.bin"]
    (tmp_path / "pinned.bin.part").write_bytes(data[:1000])
    rc, _, errors = run(capsys, "pinned", "--dir", tmp_path)
    assert (rc, errors) == (0, [])
    [hit] = files.hits("pinned.bin")
    assert hit["headers"]["Range"] == "bytes=1000-"
    assert hit["sent"] == len(data) - 1000
    assert (tmp_path / "pinned.bin").read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(files, tmp_path, capsys):
    (tmp_path / "norange.bin.part").write_bytes(b"\0" * 1000)  # not a prefix: appending would fail the hash
    rc, out, errors = run(capsys, "norange", "--dir", tmp_path)
    assert (rc, errors) == (0, []) and "restarting from zero" in out
    [hit] = files.hits("norange.bin")
    assert hit["headers"]["Range"] == "bytes=1000-"
    assert (tmp_path / "norange.bin").read_bytes() == files.bodies["norange.bin"]


def test_wrong_hash_goes_to_bad(files, tmp_path, capsys):
    rc, _, errors = run(capsys, "wrong", "--dir", tmp_path)
    assert rc == 2 and len(errors) == 1
    assert not (tmp_path / "wrong.bin").exists() and not (tmp_path / "wrong.bin.part").exists()
    assert (tmp_path / "wrong.bin.bad").read_bytes() == files.bodies["wrong.bin"]
    assert sha(files.bodies["wrong.bin"]) in errors[0] and sha(b"something else") in errors[0]
    assert "wrong.bin.bad" in errors[0]
    sums = tmp_path / "SHA256SUMS"
    assert not sums.exists() or "wrong.bin" not in sums.read_text()  # a failed file records nothing


def test_unpinned_file_is_recorded_then_enforced(files, tmp_path, capsys):
    rc, out, _ = run(capsys, "unpinned", "--dir", tmp_path)
    digest = sha(files.bodies["unpinned.bin"])
    assert rc == 0 and "unpinned" in out and "recorded" in out
    assert f"{digest}  unpinned.bin\n" in (tmp_path / "SHA256SUMS").read_text()
    target = tmp_path / "unpinned.bin"
    target.write_bytes(b"x" * SIZE)  # same size, other bytes
    os.utime(target, ns=(1, 1))      # and surely another mtime than the cached one
    rc, _, errors = run(capsys, "unpinned", "--dir", tmp_path)
    assert rc == 2 and len(errors) == 1
    assert "recorded" in errors[0] and digest in errors[0] and sha(b"x" * SIZE) in errors[0]
    assert not target.exists() and (tmp_path / "unpinned.bin.bad").exists()
    assert len(files.hits("unpinned.bin")) == 1  # a failing present file is not silently replaced
    # the rerun downloads it again and the download matches the recorded hash
    assert run(capsys, "unpinned", "--dir", tmp_path)[0] == 0
    assert target.read_bytes() == files.bodies["unpinned.bin"]


def test_redownload_must_match_the_recorded_hash(files, tmp_path, capsys):
    (tmp_path / "SHA256SUMS").write_text(f"{'a' * 64}  unpinned.bin\n")
    rc, _, errors = run(capsys, "unpinned", "--dir", tmp_path)
    assert rc == 2 and "a" * 64 in errors[0]
    assert not (tmp_path / "unpinned.bin").exists() and (tmp_path / "unpinned.bin.bad").exists()


def test_cache_avoids_rehashing(files, tmp_path, capsys, monkeypatch):
    calls = []
    real = download.sha256_of
    monkeypatch.setattr(download, "sha256_of", lambda path: calls.append(path) or real(path))
    assert run(capsys, "pinned", "--dir", tmp_path)[0] == 0
    assert run(capsys, "pinned", "--dir", tmp_path)[0] == 0
    assert calls == []                       # hashed while downloading, cached since
    os.utime(tmp_path / "pinned.bin", ns=(10 ** 9, 10 ** 9))
    assert run(capsys, "pinned", "--dir", tmp_path)[0] == 0
    assert calls == [tmp_path / "pinned.bin"]  # changed mtime: hashed once ...
    assert run(capsys, "pinned", "--dir", tmp_path)[0] == 0
    assert len(calls) == 1                     # ... and cached again


def test_community_hash_mismatch_warns_and_keeps(files, tmp_path, capsys):
    rc, out, errors = run(capsys, "community", "--dir", tmp_path)
    assert (rc, errors) == (0, [])
    assert "not the hash of the community mirror" in out and "may still be right" in out
    assert (tmp_path / "community.npz").read_bytes() == files.bodies["community.npz"]


def test_prefix_must_match(files, tmp_path, capsys, monkeypatch):
    assert run(capsys, "prefix", "--dir", tmp_path)[0] == 0
    bad = Remote("prefix.pth", "url", files.remotes["prefix"].location, sha256_prefix="00000000")
    monkeypatch.setattr(download, "catalogue", lambda: {"prefix": [bad]})
    rc, _, errors = run(capsys, "prefix", "--dir", tmp_path / "other")
    assert rc == 2 and "starting with 00000000" in errors[0]


def test_html_page_is_one_line_error(files, tmp_path, capsys):
    rc, _, errors = run(capsys, "page", "--dir", tmp_path)
    assert rc == 2 and len(errors) == 1
    assert "HTML page" in errors[0] and files.server.url("/files/page.bin") in errors[0]
    assert not (tmp_path / "page.bin").exists() and not (tmp_path / "page.bin.part").exists()


@pytest.mark.parametrize("key,code", [("missing", "404"), ("broken", "500")])
def test_http_errors_name_the_url(files, tmp_path, capsys, key, code):
    rc, out, errors = run(capsys, key, "--dir", tmp_path)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in out
    assert f"HTTP {code}" in errors[0] and files.remotes[key].location in errors[0]


def test_unauthorized_hub_mentions_hf_token(files, tmp_path, capsys):
    rc, _, errors = run(capsys, "gated", "--dir", tmp_path)
    assert rc == 2 and "HTTP 401" in errors[0] and "HF_TOKEN" in errors[0]


def test_hf_token_is_sent_to_the_hub_only(files, server, tmp_path, capsys, monkeypatch):
    data = body(9)
    server.add("/org/repo/resolve/main/moved.bin", "/cdn/moved.bin", mode="redirect")
    server.add("/cdn/moved.bin", data)
    monkeypatch.setattr(download, "catalogue", lambda: {"moved": [Remote("moved.bin", "hf", "org/repo", sha(data))]})
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert run(capsys, "moved", "--dir", tmp_path)[0] == 0
    assert server.hits("/org/repo/resolve/main/moved.bin")[0]["headers"]["Authorization"] == "Bearer secret"
    assert "Authorization" not in server.hits("/cdn/moved.bin")[0]["headers"]
    assert (tmp_path / "moved.bin").read_bytes() == data


def test_dropped_connection_keeps_part_and_rerun_completes(files, tmp_path, capsys):
    data = files.bodies["drop.bin"]
    rc, _, errors = run(capsys, "drop", "--dir", tmp_path)
    assert rc == 2 and len(errors) == 1 and "rerun the same command to resume" in errors[0]
    assert (tmp_path / "drop.bin.part").read_bytes() == data[:len(data) // 2]
    assert not (tmp_path / "drop.bin").exists()
    assert run(capsys, "drop", "--dir", tmp_path)[0] == 0
    assert files.hits("drop.bin")[1]["headers"]["Range"] == f"bytes={len(data) // 2}-"
    assert (tmp_path / "drop.bin").read_bytes() == data


def test_failures_do_not_stop_the_other_files(files, tmp_path, capsys):
    rc, _, errors = run(capsys, "missing", "pinned", "broken", "--dir", tmp_path)
    assert rc == 2 and len(errors) == 3
    assert "HTTP 404" in errors[0] and "HTTP 500" in errors[1] and "2 of 3 files failed" in errors[2]
    assert (tmp_path / "pinned.bin").read_bytes() == files.bodies["pinned.bin"]


def test_network_unreachable_suggests_mirror(files, tmp_path, capsys, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    rc, _, errors = run(capsys, "pinned", "--dir", tmp_path)
    assert rc == 2 and len(errors) == 1 and "cannot reach" in errors[0] and "--mirror" in errors[0]


def test_disk_space_is_checked_before_fetching(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(download, "_free_bytes", lambda folder: 10)
    rc, _, errors = run(capsys, "pinned", "--dir", tmp_path)
    assert rc == 2 and f"needs {SIZE} more bytes" in errors[0]
    assert files.hits("pinned.bin") == []


def test_disk_full_while_writing(files, tmp_path, capsys, monkeypatch):
    class Full:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def write(self, block):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(download, "_open_part", lambda part, start: Full())
    rc, out, errors = run(capsys, "pinned", "--dir", tmp_path)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in out
    assert "disk full" in errors[0] and f"needs {SIZE} more bytes" in errors[0]


def test_mirror_url(files, server, tmp_path, capsys, monkeypatch):
    server.add("/mirror/pinned.bin", files.bodies["pinned.bin"])
    assert run(capsys, "pinned", "--dir", tmp_path / "a", "--mirror", server.url("/mirror"))[0] == 0
    assert len(server.hits("/mirror/pinned.bin")) == 1 and files.hits("pinned.bin") == []
    monkeypatch.setenv("SOFTCFG_MIRROR", server.url("/mirror/"))
    assert run(capsys, "pinned", "--dir", tmp_path / "b")[0] == 0
    assert len(server.hits("/mirror/pinned.bin")) == 2
    assert (tmp_path / "b" / "pinned.bin").read_bytes() == files.bodies["pinned.bin"]
    rc, _, errors = run(capsys, "prefix", "--dir", tmp_path / "b")  # not in the mirror
    assert rc == 2 and "HTTP 404" in errors[0] and server.url("/mirror/prefix.pth") in errors[0]


def test_mirror_folder(files, server, tmp_path, capsys):
    mirror = tmp_path / "nfs"
    mirror.mkdir()
    (mirror / "pinned.bin").write_bytes(files.bodies["pinned.bin"])
    (mirror / "wrong.bin").write_bytes(files.bodies["wrong.bin"])
    assert run(capsys, "pinned", "--dir", tmp_path / "w", "--mirror", mirror)[0] == 0
    assert (tmp_path / "w" / "pinned.bin").read_bytes() == files.bodies["pinned.bin"]
    rc, _, errors = run(capsys, "wrong", "unpinned", "--dir", tmp_path / "w", "--mirror", mirror)
    assert rc == 2 and (tmp_path / "w" / "wrong.bin.bad").exists()  # same checks as a download
    assert any(str(mirror / "unpinned.bin") in e and "not in the mirror" in e for e in errors)
    assert server.total_requests() == 0


def test_unwritable_dir_fails_before_any_request(files, server, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    rc, _, errors = run(capsys, "pinned", "--dir", a_file)
    assert rc == 2 and "not a folder" in errors[0]
    rc, _, errors = run(capsys, "pinned", "--dir", a_file / "sub")
    assert rc == 2 and "cannot create" in errors[0]
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            rc, _, errors = run(capsys, "pinned", "--dir", locked)
            assert rc == 2 and "not writable" in errors[0]
        finally:
            locked.chmod(0o700)
    assert server.total_requests() == 0


def test_unknown_name_lists_valid_names(files, server, tmp_path, capsys):
    rc, _, errors = run(capsys, "pinned", "nonsense", "--dir", tmp_path)
    assert rc == 2 and len(errors) == 1
    assert "nonsense" in errors[0] and "pinned" in errors[0] and "unpinned" in errors[0]
    assert server.total_requests() == 0 and not (tmp_path / "pinned.bin").exists()


def test_no_names_is_a_usage_error(files, capsys):
    assert download.main([]) == 2
    assert "--all" in capsys.readouterr().err


def test_help_explains_everything(capsys):
    assert download.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("--all", "--dry-run", "--mirror", "SOFTCFG_MIRROR", "HF_TOKEN", "HF_ENDPOINT", "SHA256SUMS",
                 ".part", ".bad", "resume"):
        assert word in out, word


def test_dry_run_lists_and_fetches_nothing(files, server, tmp_path, capsys):
    dest = tmp_path / "w"
    assert run(capsys, "pinned", "--dir", dest)[0] == 0
    (dest / "drop.bin.part").write_bytes(b"x" * 100)
    rc, out, _ = run(capsys, "pinned", "unpinned", "prefix", "drop", "--dry-run", "--dir", dest)
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "present, verified" in lines["pinned.bin"] and "pinned" in lines["pinned.bin"]
    assert "size unknown" in lines["unpinned.bin"] and "unpinned" in lines["unpinned.bin"]
    assert "prefix" in lines["prefix.pth"] and "to fetch" in lines["prefix.pth"]
    assert f"{SIZE} bytes" in lines["drop.bin"] and "resumes after 100 bytes" in lines["drop.bin"]
    assert files.server.url("/org/repo/resolve/main/unpinned.bin") in lines["unpinned.bin"]
    assert f"to fetch: 3 files, {SIZE - 100} bytes" in out and "plus 2 files of unknown size" in out
    assert len(files.hits("pinned.bin")) == 1 and server.total_requests() == 1
    assert sorted(p.name for p in dest.iterdir()) == [".softcfg-download.json", "SHA256SUMS", "drop.bin.part",
                                                      "pinned.bin"]
    assert run(capsys, "pinned", "--dry-run", "--dir", tmp_path / "fresh")[0] == 0
    assert not (tmp_path / "fresh").exists()  # a dry run creates nothing


def test_gdrive_html_refusal_prints_the_manual_link(server, tmp_path, capsys, monkeypatch):
    server.add("/uc?id=abc123", "\n<!doctype html><html>Too many users have viewed or downloaded this file</html>")
    monkeypatch.setattr(download, "_gdown", lambda: None)
    monkeypatch.setattr(download, "DRIVE_URL", server.url("/uc?id={id}"))
    monkeypatch.setattr(download, "catalogue", lambda: {"drive": [Remote("drive.bin", "gdrive", "abc123")]})
    rc, _, errors = run(capsys, "drive", "--dir", tmp_path)
    assert rc == 2 and len(errors) == 1
    assert "Google Drive refused" in errors[0] and "rate-limited" in errors[0]
    assert "https://drive.google.com/file/d/abc123" in errors[0]
    assert len(server.hits("/uc?id=abc123")) == 1 and list(tmp_path.iterdir()) == []


def test_gdrive_direct_download_without_gdown(server, tmp_path, capsys, monkeypatch):
    data = body(7)
    server.add("/uc?id=ok1", data)
    monkeypatch.setattr(download, "_gdown", lambda: None)
    monkeypatch.setattr(download, "DRIVE_URL", server.url("/uc?id={id}"))
    monkeypatch.setattr(download, "catalogue", lambda: {"drive": [Remote("drive.bin", "gdrive", "ok1")]})
    assert run(capsys, "drive", "--dir", tmp_path)[0] == 0
    assert (tmp_path / "drive.bin").read_bytes() == data
    assert f"{sha(data)}  drive.bin" in (tmp_path / "SHA256SUMS").read_text()


def test_gdown_is_used_when_installed(tmp_path, capsys, monkeypatch):
    data, calls = body(8), []

    class FileURLRetrievalError(Exception):
        pass

    class FakeGdown:
        refuse = False

        @staticmethod
        def download(id, output, quiet, resume):
            calls.append((id, Path(output).name, resume))
            if FakeGdown.refuse:
                raise FileURLRetrievalError("Failed to retrieve file url: Too many users")
            Path(output).write_bytes(data)
            return output

    monkeypatch.setattr(download, "_gdown", lambda: FakeGdown)
    monkeypatch.setattr(download, "catalogue", lambda: {"drive": [Remote("drive.bin", "gdrive", "xyz", sha(data))]})
    assert run(capsys, "drive", "--dir", tmp_path / "a")[0] == 0
    assert calls == [("xyz", "drive.bin.part", True)]
    assert (tmp_path / "a" / "drive.bin").read_bytes() == data
    FakeGdown.refuse = True
    rc, _, errors = run(capsys, "drive", "--dir", tmp_path / "b")
    assert rc == 2 and "Google Drive refused" in errors[0] and "https://drive.google.com/file/d/xyz" in errors[0]


def test_files_for_the_real_registry():
    assert [r.name for r in download.files_for(["alitok_xl"])] == ["alitok_xl.bin", "AliTok.pth"]
    assert [r.name for r in download.files_for(["rar_l", "reference"])] == [
        "rar_l.bin", "maskgit-vqgan-imagenet-f16-256.bin", "VIRTUAL_imagenet256_labeled.npz"]


def test_all_dry_run_on_the_real_registry_touches_no_network(tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the dry run touched the network")

    monkeypatch.setattr(download.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    rc, out, _ = run(capsys, "--all", "--dry-run", "--dir", tmp_path / "w")
    assert rc == 0
    expected = {r.name for f in registry.MODELS.values() for r in f.downloads}
    expected |= {r.name for r in registry.EVALUATION_DOWNLOADS.values()}
    expected |= {r.name for name in registry.model_names() for r in download.config_remotes(name)}
    listed = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in expected]
    assert sorted(listed) == sorted(expected)  # each file once (AliTok.pth: three configs)
    assert f"{len(expected)} files;" in out and "AliTok.pth" in expected


def test_module_runs_without_torch(tmp_path):
    """python -m softcfg_patch.download on a login node: torch and numpy unimportable."""
    fake = tmp_path / "site"
    for name in ("torch", "numpy"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} must not be imported')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}
    result = subprocess.run([sys.executable, "-m", "softcfg_patch.download", "--dry-run", "alitok_xl",
                             "--dir", str(tmp_path / "w")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "alitok_xl.bin" in result.stdout and "AliTok.pth" in result.stdout and "size unknown" in result.stdout


def test_part_longer_than_the_file_restarts(files, tmp_path, capsys):
    (tmp_path / "pinned.bin.part").write_bytes(b"\0" * (SIZE + 10))
    assert run(capsys, "pinned", "--dir", tmp_path)[0] == 0
    [hit] = files.hits("pinned.bin")
    assert "Range" not in hit["headers"] and hit["sent"] == SIZE
    assert (tmp_path / "pinned.bin").read_bytes() == files.bodies["pinned.bin"]


def test_complete_part_of_unknown_size_is_checked_after_416(files, tmp_path, capsys):
    (tmp_path / "unpinned.bin.part").write_bytes(files.bodies["unpinned.bin"])
    rc, _, errors = run(capsys, "unpinned", "--dir", tmp_path)
    assert (rc, errors) == (0, [])
    [hit] = files.hits("unpinned.bin")
    assert hit["headers"]["Range"] == f"bytes={SIZE}-" and hit["sent"] == 0
    assert (tmp_path / "unpinned.bin").read_bytes() == files.bodies["unpinned.bin"]
