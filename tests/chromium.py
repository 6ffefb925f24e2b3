"""Headless Chromium for the book's browser tests, driven over the DevTools protocol.

``tests/test_book.py`` (a one-chapter test book) and ``tests/test_book_pages.py`` (the real
chapters of the ``smoke`` book) serve a built site from 127.0.0.1 (:func:`serve`) and load it in
Chromium through ``--remote-debugging-pipe`` (:class:`DevTools`, no extra package). The flags
(:data:`CHROMIUM_FLAGS`) send every host but 127.0.0.1 nowhere, so a test can never reach the
network even if the book regresses; :func:`assert_offline` then checks from the recorded
requests that the page asked for nothing else and that every local request succeeded.
"""

from __future__ import annotations

import fcntl
import functools
import http.server
import json
import os
import queue
import shutil
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    # Safety net: every host but 127.0.0.1 fails to resolve, so nothing leaves the machine;
    # the page's attempts still show up as requests below.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``.

    Chromium reads NUL-terminated JSON commands on fd 3 and writes replies and events on fd 4.
    """

    def __init__(self, flags: list[str], log: Path):
        # Pipe ends moved to fds >= 10 so that the child's dup2 onto 3 and 4 never has equal
        # source and target (which would keep close-on-exec set).
        cmd_read, self._cmd_write = (self._high(fd) for fd in os.pipe())
        self._reply_read, reply_write = (self._high(fd) for fd in os.pipe())
        self._log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        # posix_spawn rather than subprocess' preexec_fn: safe while other threads run.
        self.pid = os.posix_spawn(
            CHROMIUM,
            [CHROMIUM, *flags, "--remote-debugging-pipe", "about:blank"],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, self._log_fd, 1),
                (os.POSIX_SPAWN_DUP2, self._log_fd, 2),
                (os.POSIX_SPAWN_DUP2, cmd_read, 3),
                (os.POSIX_SPAWN_DUP2, reply_write, 4),
            ],
        )
        os.close(cmd_read)
        os.close(reply_write)
        self.events: queue.Queue = queue.Queue()
        self._replies: dict[int, dict] = {}
        self._ready = threading.Condition()
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._reply_read, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self._ready:
                    if "id" in message:
                        self._replies[message["id"]] = message
                        self._ready.notify_all()
                    else:
                        self.events.put(message)

    def send(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict:
        self._next_id += 1
        ident = self._next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        with self._ready:
            if not self._ready.wait_for(lambda: ident in self._replies, timeout):
                raise TimeoutError(f"no DevTools reply to {method} in {timeout} s")
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"DevTools {method}: {reply['error']}")
        return reply["result"]

    @staticmethod
    def _high(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def page_session(self) -> str:
        """A new blank tab with network and page events on; returns its session id."""
        # the first command waits for the browser to start, which under a loaded test run
        # (two workers, a kernel each) once took longer than the usual 30 s
        target = self.send("Target.createTarget", {"url": "about:blank"}, timeout=120)[
            "targetId"
        ]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self.send("Network.enable", session=session)
        self.send("Page.enable", session=session)
        return session

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        deadline = time.monotonic() + 20
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.1)
        os.close(self._cmd_write)
        os.close(self._log_fd)
        self._reader.join(timeout=5)  # EOF once Chromium is gone
        if not self._reader.is_alive():
            os.close(self._reply_read)


def serve(directory: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def assert_offline(url: str, events: list) -> list[str]:
    """Every request of the page went to 127.0.0.1 and succeeded; returns the URLs."""
    requested = [
        e["params"]["request"]["url"]
        for e in events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert url in requested
    remote = [
        u
        for u in requested
        if urlsplit(u).scheme not in ("data", "blob", "about")
        and urlsplit(u).hostname not in ("127.0.0.1", "localhost")
    ]
    assert remote == [], f"{url} requested non-local URLs: {remote}"
    failed = [
        e["params"]["response"]["url"]
        for e in events
        if e.get("method") == "Network.responseReceived"
        and e["params"]["response"]["status"] >= 400
        and not e["params"]["response"]["url"].endswith("/favicon.ico")
    ]
    failed += [
        e["params"].get("errorText", "?")
        for e in events
        if e.get("method") == "Network.loadingFailed" and not e["params"].get("canceled")
    ]
    assert failed == [], f"{url}: local requests failed: {failed}"
    return requested
