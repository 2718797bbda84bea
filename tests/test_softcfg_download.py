"""softcfg-download against a server on 127.0.0.1 started here (no internet): Hugging Face's
URL layout through HF_ENDPOINT, plain URLs, ranges honoured or ignored, an HTML page, a
connection dropped half way, 404 and 500; pinned, prefix-only, community-hash and unpinned
files; mirrors as a URL and as a folder; the real registry's names without any network."""
from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from softcfg_patch import download
from softcfg_patch.run.registry import Remote

FILES = {name: hashlib.sha256(name.encode()).digest() * 300 for name in  # 9,600 bytes each
         ("pinned.bin", "prefixed.pth", "unpinned.pt", "community.npz", "ranges.bin", "dropped.bin")}
SHA = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
HUB_CACHE = download.hub_cache  # the real lookup (the fixture replaces it)


class Handler(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        Handler.requests.append((self.path, self.headers.get("Range")))
        name = self.path.rsplit("/", 1)[-1].split("?")[0]
        if self.path.startswith("/status/"):
            return self.send_error(int(name))
        if name == "page.html" or "drive" in self.path:
            body = b"<!DOCTYPE html><html><body>Too many users have viewed or downloaded this file</body></html>"
            return self.reply(200, body, "text/html")
        if name not in FILES:
            return self.send_error(404)
        data = FILES[name]
        if name == "dropped.bin" and not self.headers.get("Range"):  # promise it all, send half, hang up
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") and "/ranges/" in self.path else 0
        if not start and self.headers.get("Range") and name == "dropped.bin":
            start = int(self.headers["Range"][6:-1])
        self.reply(206 if start else 200, data[start:], "application/octet-stream",
                   f"bytes {start}-{len(data) - 1}/{len(data)}" if start else None)

    def reply(self, code, body, kind, content_range=None):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if content_range:
            self.send_header("Content-Range", content_range)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def remotes(server, monkeypatch):
    """A small registry served by `server`; the command line resolves names through it."""
    monkeypatch.setenv("HF_ENDPOINT", server)
    monkeypatch.delenv("SOFTCFG_MIRROR", raising=False)
    Handler.requests.clear()
    table = {
        "pinned": Remote("pinned.bin", "hf", "someone/repo", SHA["pinned.bin"], len(FILES["pinned.bin"])),
        "prefixed": Remote("prefixed.pth", "url", f"{server}/files/prefixed.pth", sha256_prefix=SHA["prefixed.pth"][:8]),
        "unpinned": Remote("unpinned.pt", "url", f"{server}/files/unpinned.pt"),
        "community": Remote("community.npz", "url", f"{server}/files/community.npz", expected_sha256="0" * 64),
        "ranges": Remote("ranges.bin", "url", f"{server}/ranges/ranges.bin", SHA["ranges.bin"]),
        "dropped": Remote("dropped.bin", "url", f"{server}/files/dropped.bin", SHA["dropped.bin"]),
        "wrong": Remote("pinned.bin", "url", f"{server}/files/pinned.bin", "f" * 64),
        "page": Remote("page.html", "url", f"{server}/files/page.html"),
        "missing": Remote("gone.bin", "url", f"{server}/files/gone.bin"),
        "broken": Remote("broken.bin", "url", f"{server}/status/500"),
        "drive": Remote("drive.bin", "gdrive", "FILEID"),
    }
    monkeypatch.setattr(download, "catalogue", lambda: {k: [v] for k, v in table.items()})
    monkeypatch.setattr(download, "DRIVE_URL", f"{server}/drive?id={{id}}")
    monkeypatch.setattr(download, "_gdown", lambda: None)  # the plain-HTTP Drive path
    monkeypatch.setattr(download, "hub_cache", lambda remote: None)  # whatever this machine's HF cache holds
    return table


def run(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, the error and warning lines of stderr: the progress bars left out)"""
    code = download.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines()]
    return code, out, "\n".join(line for line in lines if line.startswith(("error:", "warning:", "Traceback")))


# ----------------------------------------------------------------------------- fresh, present
def test_a_fresh_download_is_verified_and_recorded_then_skipped(remotes, tmp_path, capsys):
    code, out, err = run(capsys, "pinned", "prefixed", "unpinned", "--dir", tmp_path)
    assert code == 0, err
    for name in ("pinned.bin", "prefixed.pth", "unpinned.pt"):
        assert (tmp_path / name).read_bytes() == FILES[name]
    assert [p.name for p in tmp_path.glob("*.part")] == []
    assert Handler.requests[0][0] == "/someone/repo/resolve/main/pinned.bin"  # the Hub's layout, via HF_ENDPOINT
    sums = (tmp_path / "SHA256SUMS").read_text().splitlines()
    assert f"{SHA['unpinned.pt']}  unpinned.pt" in sums and len(sums) == 3
    assert "unpinned" in out and "recorded" in out
    if shutil.which("sha256sum"):  # the format sha256sum -c reads
        assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True).returncode == 0
    seen = len(Handler.requests)
    calls = []
    real = download.sha256_of
    download.sha256_of = lambda path: calls.append(path) or real(path)
    try:
        code, out, _ = run(capsys, "pinned", "prefixed", "unpinned", "--dir", tmp_path)
    finally:
        download.sha256_of = real
    assert code == 0 and len(Handler.requests) == seen and "present, verified" in out
    assert calls == []  # size and mtime unchanged: the remembered hashes, no re-hashing


def test_a_tampered_unpinned_file_is_refused_against_its_first_hash(remotes, tmp_path, capsys):
    assert run(capsys, "unpinned", "--dir", tmp_path)[0] == 0
    (tmp_path / "unpinned.pt").write_bytes(b"x" + FILES["unpinned.pt"][1:])
    code, _, err = run(capsys, "unpinned", "--dir", tmp_path)
    assert code == 2 and SHA["unpinned.pt"] in err and "SHA256SUMS" in err
    assert not (tmp_path / "unpinned.pt").exists() and (tmp_path / "unpinned.pt.bad").exists()


def test_a_wrong_hash_never_stays_under_the_final_name(remotes, tmp_path, capsys):
    code, _, err = run(capsys, "wrong", "--dir", tmp_path)
    assert code == 2 and "f" * 64 in err and SHA["pinned.bin"] in err  # expected and actual
    assert not (tmp_path / "pinned.bin").exists() and (tmp_path / "pinned.bin.bad").read_bytes() == FILES["pinned.bin"]
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_a_community_hash_mismatch_warns_and_keeps_the_file(remotes, tmp_path, capsys):
    code, _, err = run(capsys, "community", "--dir", tmp_path)
    assert code == 0 and "warning" in err and "community" in err
    assert (tmp_path / "community.npz").read_bytes() == FILES["community.npz"]


# ----------------------------------------------------------------------------- resume
def test_a_truncated_part_resumes_with_a_range_request(remotes, tmp_path, capsys):
    (tmp_path / "ranges.bin.part").write_bytes(FILES["ranges.bin"][:4000])
    assert run(capsys, "ranges", "--dir", tmp_path)[0] == 0
    assert Handler.requests == [("/ranges/ranges.bin", "bytes=4000-")]
    assert (tmp_path / "ranges.bin").read_bytes() == FILES["ranges.bin"]


def test_a_server_that_ignores_ranges_restarts_from_zero(remotes, tmp_path, capsys):
    (tmp_path / "pinned.bin.part").write_bytes(b"junk" * 500)
    code, out, _ = run(capsys, "pinned", "--dir", tmp_path)
    assert code == 0 and "restarting from zero" in out
    assert (tmp_path / "pinned.bin").read_bytes() == FILES["pinned.bin"]


def test_a_dropped_connection_keeps_the_part_and_a_rerun_completes(remotes, tmp_path, capsys):
    code, _, err = run(capsys, "dropped", "--dir", tmp_path)
    assert code == 2 and "rerun" in err and not (tmp_path / "dropped.bin").exists()
    assert 0 < (tmp_path / "dropped.bin.part").stat().st_size < len(FILES["dropped.bin"])
    assert run(capsys, "dropped", "--dir", tmp_path)[0] == 0
    assert Handler.requests[-1][1].startswith("bytes=")  # the second try resumed
    assert (tmp_path / "dropped.bin").read_bytes() == FILES["dropped.bin"]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name,words", [("page", "HTML page"), ("missing", "404"), ("broken", "500"),
                                        ("drive", "Google Drive refused")])
def test_bad_answers_are_one_line_naming_the_url_and_what_to_do(remotes, tmp_path, capsys, name, words):
    code, _, err = run(capsys, name, "--dir", tmp_path)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err
    remote = remotes[name]
    assert remote.page in lines[0] or "127.0.0.1" in lines[0]
    assert not (tmp_path / remote.name).exists()


def test_one_failure_does_not_stop_the_others(remotes, tmp_path, capsys):
    code, _, err = run(capsys, "missing", "pinned", "--dir", tmp_path)
    assert code == 2 and "404" in err and (tmp_path / "pinned.bin").read_bytes() == FILES["pinned.bin"]


def test_a_bad_dir_is_refused_before_any_request(remotes, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "pinned", "--dir", tmp_path / "afile")
    assert code == 2 and "is a file" in err and Handler.requests == []
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = run(capsys, "pinned", "--dir", locked)
        assert code == 2 and "not writable" in err and Handler.requests == []


def test_an_unknown_name_lists_the_valid_ones(remotes, tmp_path, capsys):
    code, _, err = run(capsys, "alitok_xxl", "--dir", tmp_path)
    assert code == 2 and "alitok_xxl" in err and "pinned" in err and not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- mirrors
def test_a_mirror_as_a_url_and_as_a_folder(remotes, server, tmp_path, capsys):
    assert run(capsys, "pinned", "--dir", tmp_path / "a", "--mirror", f"{server}/files")[0] == 0
    assert Handler.requests[-1][0] == "/files/pinned.bin"
    assert (tmp_path / "a" / "pinned.bin").read_bytes() == FILES["pinned.bin"]
    seen = len(Handler.requests)
    os.environ["SOFTCFG_MIRROR"] = str(tmp_path / "a")
    try:
        assert run(capsys, "pinned", "--dir", tmp_path / "b")[0] == 0
    finally:
        del os.environ["SOFTCFG_MIRROR"]
    assert len(Handler.requests) == seen and (tmp_path / "b" / "pinned.bin").read_bytes() == FILES["pinned.bin"]
    code, _, err = run(capsys, "unpinned", "--dir", tmp_path / "c", "--mirror", tmp_path / "a")
    assert code == 2 and "not in the mirror" in err


# ----------------------------------------------------------------------------- the real registry
def test_the_real_registry_names_every_official_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SOFTCFG_MIRROR", raising=False)
    assert [r.name for r in download.files_for(["alitok_xl"])] == ["alitok_xl.bin", "AliTok.pth"]
    assert [r.name for r in download.files_for(["rar_l", "reference", "inception"])] == [
        "rar_l.bin", "maskgit-vqgan-imagenet-f16-256.bin", "VIRTUAL_imagenet256_labeled.npz",
        "pt_inception-2015-12-05-6726825d.pth"]
    every = download.every_file()
    assert len({r.name for r in every}) == len(every) == 20  # the 19 of the tables and the 512 reference
    pinned = {r.name for r in every if r.sha256}
    assert {"rar_xxl.bin", "c2i_3B_384.pt", "vq_ds16_c2i.pt"} <= pinned and "AliTok.pth" not in pinned
    code, out, _ = run(capsys, "--all", "--dry-run", "--dir", tmp_path / "w")
    assert code == 0 and "12386725354" in out and "to fetch: 20 files" in out and not (tmp_path / "w").exists()
    assert download.command_for("weights/alitok_xl.bin") == "softcfg-download alitok_xl --dir weights"
    assert download.command_for("/data/AliTok.pth") == "softcfg-download AliTok.pth --dir /data"
    assert download.command_for("weights/mine.bin") is None


def test_table_scripts_download_every_input_first_with_download_1(tmp_path):
    """DOWNLOAD=1: common.sh's setting() runs softcfg-download for the model, the reference and
    Inception (those not given by REF / INCEPTION) before its input check; PYTHON records calls."""
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    script = f'source {root}/scripts/common.sh; setting t alitok_xl CFG; REF=/r.npz setting t rar_l CFG'
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "DOWNLOAD": "1", "WEIGHTS": str(tmp_path / "w")}
    subprocess.run(["bash", "-c", script], env=env, check=True, timeout=60)
    calls = log.read_text().splitlines()
    assert calls[0] == f"-m softcfg_patch.download alitok_xl reference inception --dir {tmp_path / 'w'}"
    assert calls[1].startswith(f"{root}/scripts/run_setting.py --check-only")
    assert f"-m softcfg_patch.download rar_l inception --dir {tmp_path / 'w'}" in calls


def test_a_file_in_the_hugging_face_cache_is_copied_not_downloaded(remotes, tmp_path, capsys, monkeypatch):
    import types
    cached = tmp_path / "hub" / "pinned.bin"
    cached.parent.mkdir()
    cached.write_bytes(FILES["pinned.bin"])
    asked = []
    fake = types.SimpleNamespace(try_to_load_from_cache=lambda repo, name, revision=None: asked.append(
        (repo, name, revision)) or str(cached))
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    monkeypatch.setattr(download, "hub_cache", HUB_CACHE)
    code, out, _ = run(capsys, "pinned", "--dir", tmp_path / "w")
    assert code == 0 and asked == [("someone/repo", "pinned.bin", "main")] and Handler.requests == []
    assert (tmp_path / "w" / "pinned.bin").read_bytes() == FILES["pinned.bin"] and cached.exists()
