"""Benchmark: image file upload and download through a real nanod, against `cp`.

    .venv/bin/python tests/bench/bench_images.py [--size-mib 1024] [--small-mib 256]
                                                  [--dir /var/tmp] [--repeat 3] [--quick]

Starts `nanod serve` as a subprocess (SQLite, reconciler off) with its data directory in
a temp directory under --dir, and in the same run, on the same disk, compares like with
like:
- upload: POST /media_images/{id}/file/ (streamed multipart, checked, synced, moved into
  place), with a lean client (sendfile from the page cache, so the client costs almost
  nothing) and with `curl -F image=@SRC`, against `cp SRC DST` with SRC in the page cache
  (the goal's baseline), and against `cp` followed by an fsync of DST (nanod syncs an
  upload before it installs it: the like-for-like floor); and once with SRC evicted from
  the page cache (the client reads it from the disk) against `cp` of an evicted file;
- download: GET /media_images/{id}/file/ into a file (lean client: recv_into + write;
  and `curl -o DST`), of the stored file as the upload left it (written with O_DIRECT,
  so not in the page cache) against `cp` of that same file evicted from the page cache,
  and of the stored file in the page cache against `cp` of a cached source; once more
  with a client that drops the bytes rather than write them (nanod's side alone: on
  this VM, writing a fresh file into the page cache is often the slow part);
- nanod's peak RSS (VmHWM of /proc/PID/status, reset through /proc/PID/clear_refs before
  each phase) while it receives a --small-mib file and a --size-mib file: it should not
  grow with the file.
Every copy is checked by SHA-1. The files (source, copies, the image store) are removed at
the end and nanod is stopped by its pid. Not part of the test run (ARCHITECTURE.md §5:
timing is measured, never asserted).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.common import (  # noqa: E402
    MiB,
    add_quick,
    cannot_run,
    free_port,
    parse,
    write_nanod_config,
)

PASSWORD = "Bench1Password"


def make_source(path: Path, size: int) -> str:
    """Random bytes with an ISO 9660 volume descriptor where nanod sniffs for it."""
    digest = hashlib.sha1()
    with open(path, "wb") as fh:
        written = 0
        while written < size:
            block = bytearray(os.urandom(min(8 * MiB, size - written)))
            if written == 0:
                block[32769:32774] = b"CD001"
            fh.write(block)
            digest.update(block)
            written += len(block)
    return digest.hexdigest()


def sha1_file(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        while block := fh.read(8 * MiB):
            digest.update(block)
    return digest.hexdigest()


class Nanod:
    """`nanod serve` in a subprocess, and a tiny JSON client for it."""

    def __init__(self, workdir: Path, max_upload: int) -> None:
        self.port = free_port()
        self.data = workdir / "data"
        config = write_nanod_config(workdir / "nanod.yaml", {
            "listen": f"127.0.0.1:{self.port}", "data_dir": str(self.data),
            "log_level": "warning", "reconciler": {"enabled": False},
            "images": {"max_upload_bytes": max_upload},
        })
        self.base = f"http://127.0.0.1:{self.port}/api/v1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanod", "serve", "--config", str(config)], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=open(workdir / "nanod.err", "wb"))
        self.session = ""
        deadline = time.monotonic() + 30
        while True:
            try:
                self.call("GET", "/system/")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"nanod did not start: see {workdir / 'nanod.err'}") from None
                time.sleep(0.1)
        self.call("POST", "/system/", {"user": "admin", "password": PASSWORD})
        self.session = self.call("POST", "/sessions/", {"user": "admin", "password": PASSWORD,
                                                        "nonce": "b"})["session"]

    def call(self, method: str, path: str, body: object = None) -> object:
        request = urllib.request.Request(
            self.base + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Nano-Session": self.session})
        with urllib.request.urlopen(request, timeout=30) as response:
            doc = json.loads(response.read())
        if doc["error_code"]:
            raise SystemExit(f"{method} {path}: {doc['message']}")
        return doc.get("data")

    def stored_file(self, image_id: str) -> Path:
        """The file of the image's current version in nanod's store."""
        found = sorted((self.data / "images" / "media").glob(f"{image_id}.*.iso"),
                       key=lambda p: int(p.name.split(".")[1]))
        if not found:
            raise SystemExit(f"no stored file for image {image_id}")
        return found[-1]

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def cpu_seconds(self) -> float:
        """User + system CPU time nanod used so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def curl(self, *args: str) -> float:
        start = time.perf_counter()
        done = subprocess.run(["curl", "-sS", "--fail-with-body", "-H",
                               f"Nano-Session: {self.session}", *args],
                              capture_output=True, check=False)
        elapsed = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"curl {' '.join(args)} failed: {done.stderr.decode()}")
        if done.stdout.startswith(b"{"):
            doc = json.loads(done.stdout)
            if doc["error_code"]:
                raise SystemExit(f"curl {' '.join(args)}: {doc['message']}")
        return elapsed

    def curl_upload(self, image_id: str, source: Path) -> float:
        return self.curl("-F", f"image=@{source};type=application/octet-stream",
                         f"{self.base}/media_images/{image_id}/file/")

    def curl_download(self, image_id: str, target: Path) -> float:
        return self.curl("-o", str(target), f"{self.base}/media_images/{image_id}/file/")

    def _request(self, head: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(head.encode())
        return sock

    @staticmethod
    def _response(sock: socket.socket) -> tuple[bytes, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                raise SystemExit(f"connection closed: {data[:200]!r}")
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        return head, rest

    def upload(self, image_id: str, source: Path) -> float:
        """A lean client: the file goes from the page cache to the socket with sendfile,
        so what is measured is nanod, not the client."""
        boundary = "benchBoundary7MA4YWxkTrZu0gW"
        opening = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                   f"filename=\"{source.name}\"\r\nContent-Type: application/octet-stream"
                   "\r\n\r\n").encode()
        closing = f"\r\n--{boundary}--\r\n".encode()
        length = len(opening) + source.stat().st_size + len(closing)
        start = time.perf_counter()
        sock = self._request(
            f"POST /api/v1/media_images/{image_id}/file/ HTTP/1.1\r\nHost: bench\r\n"
            f"Nano-Session: {self.session}\r\nContent-Length: {length}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n")
        with sock, open(source, "rb") as fh:
            sock.sendall(opening)
            sock.sendfile(fh)
            sock.sendall(closing)
            head, body = self._response(sock)
            elapsed = time.perf_counter() - start
        if b'"error_code": 0' not in body:
            raise SystemExit(f"upload failed: {head!r} {body[:300]!r}")
        return elapsed

    def download(self, image_id: str, target: Path | None) -> float:
        """A lean client: recv_into one buffer, write to the target file (None: drop the
        bytes, which shows nanod's side alone)."""
        start = time.perf_counter()
        sock = self._request(f"GET /api/v1/media_images/{image_id}/file/ HTTP/1.1\r\n"
                             f"Host: bench\r\nNano-Session: {self.session}\r\n\r\n")
        with sock, open(target or os.devnull, "wb") as out:
            head, rest = self._response(sock)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            out.write(rest)
            left = length - len(rest)
            buf = memoryview(bytearray(4 * MiB))
            while left:
                got = sock.recv_into(buf, min(len(buf), left))
                if not got:
                    raise SystemExit("download cut short")
                if target is not None:
                    out.write(buf[:got])
                left -= got
        return time.perf_counter() - start

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_cp(source: Path, target: Path, *, sync: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of cp)."""
    cpu = children_cpu()
    start = time.perf_counter()
    subprocess.run(["cp", str(source), str(target)], check=True)
    if sync:
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed, children_cpu() - cpu


CP, CP_FSYNC, CP_COLD = "cp", "cp + fsync", "cp, cold source"
BASELINES = {
    "upload (lean client)": CP, "upload (curl -F)": CP, "upload, cold source (lean)": CP_COLD,
    "download, cold (lean client)": CP_COLD, "download, cold (curl -o)": CP_COLD,
    "download, cached (lean)": CP, "download, cached (dropped)": CP,
}
EXTRA_BASELINES = {"upload (lean client)": (CP_FSYNC,), "upload (curl -F)": (CP_FSYNC,)}


def evict(path: Path) -> None:
    """Drop `path` from the page cache (it is on the disk: callers sync first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    """Read `path` once, so that it is in the page cache."""
    with open(path, "rb") as fh:
        while fh.read(8 * MiB):
            pass


def rate(size: int, seconds: float) -> str:
    return f"{size / MiB / seconds:7.0f} MiB/s ({seconds:6.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--small-mib", type=int, default=256)
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="where the temp directory goes (one disk for everything)")
    parser.add_argument("--repeat", type=int, default=3)
    add_quick(parser, {"size_mib": 16, "small_mib": 4, "repeat": 1})
    args = parse(parser)
    size, small = args.size_mib * MiB, args.small_mib * MiB
    if shutil.which("curl") is None:
        cannot_run("curl is not installed (apt-get install curl)")
    workdir = Path(tempfile.mkdtemp(prefix="nano-bench-images-", dir=args.dir))
    nanod: Nanod | None = None
    try:
        big_src, small_src = workdir / "big.iso", workdir / "small.iso"
        print(f"making {args.size_mib} MiB and {args.small_mib} MiB source files in {workdir}")
        big_sha1 = make_source(big_src, size)
        make_source(small_src, small)
        os.sync()
        nanod = Nanod(workdir, max_upload=2 * size)
        image = nanod.call("POST", "/media_images/", {"name": "bench"})["id"]  # type: ignore[index]
        small_image = nanod.call("POST", "/media_images/", {"name": "small"})["id"]  # type: ignore[index]

        # peak RSS while receiving a small and a big file (first uploads of each)
        nanod.reset_peak()
        idle = nanod.peak_rss_mib()
        nanod.reset_peak()
        nanod.upload(small_image, small_src)
        rss_small = nanod.peak_rss_mib()
        nanod.reset_peak()
        nanod.upload(image, big_src)
        rss_big = nanod.peak_rss_mib()

        # Each measurement starts with no dirty pages left by the one before (os.sync).
        runs: dict[str, list[tuple[float, float]]] = {}  # label -> [(wall, cpu)]
        copy = workdir / "copy.iso"

        def check_copy() -> None:
            if sha1_file(copy) != big_sha1:
                raise SystemExit("the downloaded file differs from the source")
            copy.unlink()

        def through_nanod(label: str, step: Any) -> None:
            cpu = nanod.cpu_seconds()
            wall = step()
            runs.setdefault(label, []).append((wall, nanod.cpu_seconds() - cpu))

        def measure(label: str, step: Any, *, cold: Path | None = None,
                    cached: Path | None = None) -> None:
            os.sync()
            if cold is not None:
                evict(cold)
            if cached is not None:
                warm(cached)
            if label.startswith("cp"):
                runs.setdefault(label, []).append(step())
            else:
                through_nanod(label, step)
                if label.startswith("download") and copy.exists():
                    check_copy()

        for _ in range(args.repeat):
            measure(CP, lambda: timed_cp(big_src, copy, sync=False), cached=big_src)
            measure(CP_FSYNC, lambda: timed_cp(big_src, copy, sync=True), cached=big_src)
            measure("upload (lean client)", lambda: nanod.upload(image, big_src),
                    cached=big_src)
            measure("upload (curl -F)", lambda: nanod.curl_upload(image, big_src),
                    cached=big_src)
            stored = nanod.stored_file(image)
            measure(CP_COLD, lambda s=stored: timed_cp(s, copy, sync=False), cold=stored)
            measure("upload, cold source (lean)", lambda: nanod.upload(image, big_src),
                    cold=big_src)
            stored = nanod.stored_file(image)
            measure("download, cold (lean client)", lambda: nanod.download(image, copy),
                    cold=stored)
            measure("download, cold (curl -o)", lambda: nanod.curl_download(image, copy),
                    cold=stored)
            measure("download, cached (lean)", lambda: nanod.download(image, copy),
                    cached=stored)
            measure("download, cached (dropped)", lambda: nanod.download(image, None),
                    cached=stored)
        status = nanod.call("GET", f"/media_images/{image}")
        if status["checksum"] != big_sha1:  # type: ignore[index]
            raise SystemExit("nanod's checksum differs from the source")

        median = {label: statistics.median(w for w, _ in samples)
                  for label, samples in runs.items()}
        print(f"\nfile: {args.size_mib} MiB, median of {args.repeat}; one disk: {workdir}; "
              f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
        print(f"  {'':30s} {'throughput':>24s}   {'ratio':>5s} {'to':12s}  CPU s")
        for label, samples in runs.items():
            t = median[label]
            cpu = statistics.median(c for _, c in samples)
            who = "cp" if label.startswith("cp") else "nanod"
            base = BASELINES.get(label)
            versus = f"{median[base] / t:5.2f} {base:12s}" if base else f"{'':5s} {'':12s}"
            print(f"  {label:30s} {rate(size, t)}   {versus}  {cpu:5.2f} ({who})")
            for extra in EXTRA_BASELINES.get(label, ()):
                print(f"  {'':30s} {'':24s}   {median[extra] / t:5.2f} {extra:12s}")
        print("  goal: >= 0.5 of cp; each row says which cp: a cached source, or a cold one "
              "(evicted from the page cache)")
        print("nanod peak RSS (VmHWM):")
        print(f"  idle after start   {idle:7.1f} MiB")
        print(f"  {args.small_mib:5d} MiB upload   {rss_small:7.1f} MiB")
        print(f"  {args.size_mib:5d} MiB upload   {rss_big:7.1f} MiB  "
              f"(growth vs small: {rss_big - rss_small:+.1f} MiB)")
    finally:
        if nanod is not None:
            nanod.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"removed {workdir}")


if __name__ == "__main__":
    main()
