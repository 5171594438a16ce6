"""A small driver for the system's Chromium (Debian's ``chromium`` package), standard library only.

It speaks the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages ending in a NUL
byte on file descriptors 3 and 4), so no driver or browser is downloaded and no port is opened.
What the report tests need: open a file URL, evaluate JavaScript, collect console errors and
failed loads, and take a full-page screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BROWSER_NAMES = ("chromium", "chromium-browser")
TRAMPOLINE = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
              "os.execv(sys.argv[3], sys.argv[3:])")


def find_chromium() -> str | None:
    """``LEUKODET_CHROMIUM`` when set, else the first Chromium on PATH, else None."""
    configured = os.environ.get("LEUKODET_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    return next((found for found in map(shutil.which, BROWSER_NAMES) if found), None)


def above_nine(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Chromium:
    """One headless browser process; ``open`` gives a ``Page`` per URL."""

    def __init__(self, binary: str, timeout: float = 30.0):
        self.timeout = timeout
        self.profile = tempfile.TemporaryDirectory(prefix="leukodet-chromium-")
        self.log = open(Path(self.profile.name) / "stderr.log", "w+b")  # noqa: SIM115 - closed in close()
        commands_read, self.commands = os.pipe()
        self.replies, replies_write = os.pipe()
        # the browser expects the pipe on descriptors 3 (commands) and 4 (replies): a Python trampoline
        # puts the ends there and becomes the browser; they are first moved above 9 so that placing
        # one on 3 or 4 never overwrites the other
        commands_read, replies_write = (above_nine(fd) for fd in (commands_read, replies_write))
        self.process = subprocess.Popen(
            [sys.executable, "-c", TRAMPOLINE, str(commands_read), str(replies_write), binary, "--headless",
             "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--hide-scrollbars", "--window-size=1280,900", f"--user-data-dir={self.profile.name}", "about:blank"],
            pass_fds=(commands_read, replies_write), stdout=subprocess.DEVNULL, stderr=self.log)
        os.close(commands_read)
        os.close(replies_write)
        self.buffer = b""
        self.last_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive(time.monotonic() + self.timeout)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def receive(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer in time; its last words:\n{self.last_words()}")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe; its last words:\n{self.last_words()}")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def last_words(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def wait_for(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for k, event in enumerate(self.events):
                if event.get("method") == method and event.get("sessionId") == session:
                    return self.events.pop(k)
            self.events.append(self.receive(deadline))

    def open(self, url: str) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": url}, session)
        self.wait_for("Page.loadEventFired", session)
        return Page(self, session)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            self.process.kill()
        self.process.wait(timeout=30)
        os.close(self.commands)
        os.close(self.replies)
        self.log.close()
        self.profile.cleanup()


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser = browser
        self.session = session

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (a promise is awaited); raises on a JS exception."""
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                        "returnByValue": True}, self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def load_every_image(self) -> list[dict]:
        """Load every <img> now (lazy ones too) and return, per image, its URL and whether it loaded."""
        return self.evaluate("""Promise.all(Array.from(document.images, img => {
            img.loading = "eager";
            const done = () => ({src: img.src, loaded: img.complete && img.naturalWidth > 0});
            if (img.complete) return done();
            return new Promise(resolve => {
                img.addEventListener("load", () => resolve(done()));
                img.addEventListener("error", () => resolve(done()));
            });
        }))""")

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far on this page."""
        self.evaluate("0")  # flush events queued before now
        errors = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                errors.append(json.dumps(params["exceptionDetails"])[:500])
            elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif event.get("method") == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")
        return errors

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page, below the fold too."""
        size = self.browser.send("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 12000), "scale": 1}
        shot = self.browser.send("Page.captureScreenshot", {"format": "png", "clip": clip,
                                                             "captureBeyondViewport": True}, self.session)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
