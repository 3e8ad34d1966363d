"""Screenshots of a backend's web UI in headless Chromium (Debian `chromium`), for the pages in this folder.

    .venv-backends/bin/python docs/backends/screenshot.py URL OUT.png [--click TEXT ...] [--wait S]

Chromium's own `--screenshot` cannot dismiss a first-visit pop-up; this drives it over the DevTools protocol
(with `websockets`, which Phoenix brings into the backends venv): load the page, click each button whose text
or label is one of `--click`, then capture. Hand-written because the usual drivers (Playwright, Selenium)
download their own browser, and this machine has no network for that.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import subprocess
import tempfile
import time
import urllib.request

import websockets

_CLICK = """(labels) => { let n = 0;
  for (const el of document.querySelectorAll('button, [role=button]')) {
    const name = (el.innerText || el.getAttribute('aria-label') || '').trim();
    if (labels.includes(name)) { el.click(); n++; } }
  return n; }"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _shoot(ws_url: str, url: str, out: str, clicks: list[str], wait_s: float, width: int, height: int) -> None:
    async with websockets.connect(ws_url, max_size=None) as ws:
        counter = 0

        async def call(method: str, **params):
            nonlocal counter
            counter += 1
            await ws.send(json.dumps({"id": counter, "method": method, "params": params}))
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("id") == counter:
                    return reply.get("result", {})

        await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        await call("Page.enable")
        await call("Page.navigate", url=url)
        await asyncio.sleep(wait_s)
        for _ in range(3):  # a pop-up may open another
            result = await call("Runtime.evaluate", expression=f"({_CLICK})({json.dumps(clicks)})",
                                returnByValue=True)
            if not result.get("result", {}).get("value"):
                break
            await asyncio.sleep(1.0)
        shot = await call("Page.captureScreenshot", format="png")
        with open(out, "wb") as f:
            f.write(base64.b64decode(shot["data"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--click", action="append", default=[], help="text or aria-label of a button to click")
    parser.add_argument("--wait", type=float, default=6.0, help="seconds to let the page load")
    parser.add_argument("--size", default="1600x1000")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=1))
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration):
                time.sleep(0.1)
        else:
            raise SystemExit("chromium did not start")
        asyncio.run(_shoot(page["webSocketDebuggerUrl"], args.url, args.out, args.click, args.wait, width, height))
        print(args.out)
    finally:
        browser.kill()


if __name__ == "__main__":
    main()
