"""A headless Chromium for tests, driven over the DevTools protocol.

Chromium is started with ``--remote-debugging-pipe``: it reads
NUL-separated JSON commands on file descriptor 3 and answers on 4, so no
websocket client and no open port are needed. :func:`chromium` finds the
browser, installing Debian's ``chromium`` package where it is missing and
the tests run as root with ``apt-get`` (as ``.ci/run`` does); otherwise it
returns the reason to skip.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _which() -> Optional[str]:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium(install: bool = True) -> Tuple[Optional[str], str]:
    """``(path, "")``, or ``(None, why not)``: the reason to skip."""
    path = _which()
    if path or not install:
        return path, "" if path else "no Chromium on PATH"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, (
            "no Chromium on PATH and it cannot be installed here (needs root "
            "and apt-get): install Debian's 'chromium' package to run this test"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        try:
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=600
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return None, f"installing Chromium failed: {' '.join(cmd)}: {err}"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            return None, (
                f"installing Chromium failed: {' '.join(cmd)} exited "
                f"{done.returncode} ({' '.join(tail)})"
            )
    path = _which()
    return path, "" if path else "apt-get installed chromium but it is not on PATH"


class Browser:
    r"""One headless Chromium page.

    Examples::

        >>> with Browser(exe) as b:
        ...     b.open(path)                       # waits for the load event
        ...     b.eval("document.title")
        ...     b.errors                           # console errors, exceptions
    """

    def __init__(self, exe: str, width: int = 1280, height: int = 1600) -> None:
        self._log = tempfile.TemporaryFile()  # Chromium's own messages
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def child() -> None:  # the pipe ends at fds 3 and 4, as Chromium wants
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                exe, "--headless", "--no-sandbox", "--disable-gpu",
                "--remote-debugging-pipe", "--no-first-run",
                "--disable-dev-shm-usage",
                "--disable-extensions", f"--window-size={width},{height}",
                "about:blank",
            ],
            preexec_fn=child, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._log,
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: List[Dict[str, Any]] = []
        try:
            target = self.call("Target.createTarget", url="about:blank")
            self.session = self.call(
                "Target.attachToTarget", targetId=target["targetId"], flatten=True
            )["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                self.call(f"{domain}.enable", session=True)
        except BaseException:
            self.close()  # never leave a browser behind
            raise

    # ------------------------------------------------------------ protocol
    def _read(self, timeout: float) -> Dict[str, Any]:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                self._log.seek(0)
                tail = self._log.read().decode(errors="replace").splitlines()[-5:]
                raise RuntimeError(
                    "Chromium closed the DevTools pipe (it exited); its last "
                    "messages:\n" + "\n".join(tail)
                )
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(
        self, method: str, session: bool = False, timeout: float = 60, **params: Any
    ) -> Dict[str, Any]:
        """Send one command; return its result (events are kept in ``events``)."""
        self._id += 1
        msg: Dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 60) -> Dict[str, Any]:
        for e in self.events:
            if e.get("method") == event:
                return e
        end = time.monotonic() + timeout
        while True:
            e = self._read(max(0.01, end - time.monotonic()))
            self.events.append(e)
            if e.get("method") == event:
                return e

    # ----------------------------------------------------------- the page
    def open(self, path: Path) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=Path(path).resolve().as_uri())
        self.wait_for("Page.loadEventFired")

    def eval(self, expression: str) -> Any:
        out = self.call(
            "Runtime.evaluate", session=True, expression=expression,
            returnByValue=True, awaitPromise=True,
        )  # fmt: skip
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element (scrolled into view)."""
        box = self.eval(
            f"(function () {{ var e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'});"
            " var r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent", session=True, type=kind, x=box[0],
                y=box[1], button="left", clickCount=1,
            )  # fmt: skip

    @property
    def errors(self) -> List[str]:
        """Console errors, uncaught exceptions and failed loads so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value")) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails", {}))[:500])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out

    def screenshot(self, path: Path) -> Path:
        """The whole page as a PNG."""
        size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
        data = self.call(
            "Page.captureScreenshot", session=True, format="png",
            captureBeyondViewport=True,
            clip=dict(x=0, y=0, width=size["width"], height=size["height"], scale=1),
        )["data"]  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    # ------------------------------------------------------------- closing
    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
