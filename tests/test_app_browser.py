"""The page in headless Chromium: type a prompt, click Generate, drag the yaw slider, and see the portrait turn.

Protects what only a browser shows: the page loads offline (no request leaves loopback), it names
the model, the Generate button and the yaw slider's live re-render are wired to the right
components, and the image shown after the slider moved differs from the one before. Screenshots
go to the test's tmp folder, or to $DREAMPORTRAIT_SCREENSHOTS if set. The page runs the tiny test
model unless $DREAMPORTRAIT_BROWSER_CHECKPOINT names another (e.g. checkpoints/default, to take
the README's screenshot: page.png); by default it shares the end-to-end tests' server.

Chromium is driven over its DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
ending in NUL on file descriptors 3 and 4), so no extra Python package is needed. Without
Debian's `chromium` the test skips, saying how to install it, unless DREAMPORTRAIT_REQUIRE_BROWSER=1.
"""
import base64
import contextlib
import fcntl
import io
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from test_app import PROMPT
from test_app_e2e import WIDE, shared_server, tiny_checkpoint
from dreamportrait.app_logic import app_process, model_name
from dreamportrait.checkpoints import GENERATOR_FILE, read_model_metadata
from dreamportrait.generator import GeneratorConfig

STEP_TIMEOUT = 90  # seconds for any one wait in the page


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "headless Chromium not found: `apt-get install -y chromium` enables the browser test"
        if os.environ.get("DREAMPORTRAIT_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (DREAMPORTRAIT_REQUIRE_BROWSER=1 requires it)")
        pytest.skip(message)
    return path


def _above_ten(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol on a pipe."""

    FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
             "--disable-extensions", "--disable-sync", "--no-first-run", "--no-default-browser-check",
             "--metrics-recording-only", "--no-proxy-server", "--disable-features=Translate,MediaRouter,OptimizationHints",
             "--window-size=1280,1600", "--hide-scrollbars", "--mute-audio"]

    def __init__(self, executable: str, profile: Path):
        to_browser, self._command_fd = os.pipe()
        self._event_fd, from_browser = os.pipe()
        # The DevTools pipe is fd 3 (commands in) and fd 4 (replies out) of the browser; the pipe ends
        # move to fds >= 10 first so that moving them to 3 and 4 cannot clobber one another.
        to_browser, from_browser = (_above_ten(fd) for fd in (to_browser, from_browser))
        script = f'exec "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-'
        self.proc = subprocess.Popen(["bash", "-c", script, "bash", executable, *self.FLAGS,
                                      f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                                     pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._ids = itertools.count(1)
        self._buffer = b""
        self.events: list[dict] = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable", session=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._event_fd, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe (it crashed or exited)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: bool = False, **params) -> dict:
        """Send one command and return its result (events arriving meanwhile are kept in ``events``)."""
        msg_id = next(self._ids)
        message = {"id": msg_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._command_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str):
        """Poll a page expression until it is truthy; returns its value."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {STEP_TIMEOUT} s waiting for {what}")

    def center(self, selector: str) -> tuple[float, float, float]:
        """(x, y, width) of an element's box in page pixels, scrolled into view."""
        box = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
                            "return [r.x + r.width / 2, r.y + r.height / 2, r.width]; })()")
        return tuple(box)

    def mouse(self, kind: str, x: float, y: float):
        self.send("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y, button="left",
                  buttons=1 if kind != "mouseReleased" else 0, clickCount=1)

    def click(self, selector: str):
        x, y, _ = self.center(selector)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def type_into(self, selector: str, text: str):
        """Focus a field, select its content and type ``text`` over it (real input events)."""
        self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.select(); }})()")
        self.send("Input.insertText", session=True, text=text)

    def screenshot(self, selector: str, path: Path) -> np.ndarray:
        """PNG of one element (page coordinates), saved to ``path``; returns its pixels."""
        self.center(selector)
        rect = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                             ".getBoundingClientRect(); return [r.x + window.scrollX, r.y + window.scrollY, "
                             "r.width, r.height]; })()")
        x, y, w, h = rect
        data = self.send("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True,
                         clip={"x": x, "y": y, "width": w, "height": h, "scale": 1})["data"]
        path.write_bytes(base64.b64decode(data))
        return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))

    def requested_hosts(self) -> set[str]:
        return {urlparse(e["params"]["request"]["url"]).hostname or "" for e in self.events
                if e.get("method") == "Network.requestWillBeSent"}

    def close(self):
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        os.close(self._command_fd)
        os.close(self._event_fd)


IMAGE = "#portrait img"
IMAGE_SRC = f"document.querySelector('{IMAGE}')?.src || ''"
IMAGE_READY = f"(() => {{ const i = document.querySelector('{IMAGE}'); return !!(i && i.complete && i.naturalWidth); }})()"


def test_type_generate_and_turn_the_head(tmp_path):
    executable = chromium_path()
    shots = Path(os.environ.get("DREAMPORTRAIT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    other = os.environ.get("DREAMPORTRAIT_BROWSER_CHECKPOINT")
    checkpoint = Path(other) if other else tiny_checkpoint(**WIDE)
    model_file = checkpoint / GENERATOR_FILE if checkpoint.is_dir() else checkpoint
    meta = read_model_metadata(model_file)
    resolution = GeneratorConfig.from_dict(meta.config["generator"]).img_resolution
    with app_process(checkpoint, tmp_path / "app.log") if other else contextlib.nullcontext((shared_server(), None)) \
            as (url, _):
        browser = Browser(executable, tmp_path / "profile")
        try:
            browser.send("Page.navigate", session=True, url=url)
            browser.wait_for("!!document.querySelector('#generate') && !!document.querySelector('#yaw input[type=range]')",
                             "the page to load")
            info = browser.evaluate("document.querySelector('#model-info').innerText")
            assert model_name({"file": str(model_file), **meta.extra}) in info and "kimg" in info
            assert f"{resolution}×{resolution}" in info

            browser.type_into("#prompt textarea", PROMPT)
            browser.type_into("#seed textarea, #seed input", "7")
            browser.click("#generate")
            browser.wait_for(IMAGE_READY, "the generated portrait")
            browser.wait_for("document.querySelector('#caption').innerText.includes('seed 7')", "the caption")
            before = browser.screenshot(IMAGE, shots / "generated.png")
            assert before.std() > 5, "the portrait must not be blank"
            first_src = browser.evaluate(IMAGE_SRC)

            # Drag the yaw slider's thumb from the middle (0 degrees) towards the right end.
            x, y, width = browser.center("#yaw input[type=range]")
            browser.mouse("mousePressed", x, y)
            for step in range(1, 11):
                browser.mouse("mouseMoved", x + step * width * 0.035, y)
                time.sleep(0.05)
            browser.mouse("mouseReleased", x + width * 0.35, y)
            yaw = float(browser.evaluate("document.querySelector('#yaw input[type=range]').value"))
            assert yaw > 20, f"the drag must move the yaw slider, it reads {yaw}"
            browser.wait_for(f"document.querySelector('#caption').innerText.includes('yaw +{yaw:g}°')",
                             "the re-render at the final slider value")
            browser.wait_for(f"{IMAGE_SRC} !== {json.dumps(first_src)} && {IMAGE_READY}", "the new image")
            after = browser.screenshot(IMAGE, shots / "after-yaw.png")
            browser.screenshot("body", shots / "page.png")
        finally:
            browser.close()
    assert after.shape == before.shape
    assert np.abs(after.astype(int) - before).mean() > 2, "the portrait must change after the yaw slider moved"
    hosts = browser.requested_hosts()
    assert hosts and hosts <= {"127.0.0.1", ""}, f"the page fetched from outside loopback: {hosts}"
