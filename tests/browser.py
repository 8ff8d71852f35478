"""Render HTML in headless Chromium: screenshot it, dump the DOM it built, read the DOM.

A real browser, no mocks: what it shows is what a user opening the report file sees.
The DOM is parsed with the standard library's html.parser into a small element tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterator

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def chromium() -> str | None:
    for c in CHROMIUM_CANDIDATES:
        path = shutil.which(c) if not os.path.isabs(c) else (c if os.access(c, os.X_OK) else None)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed")
    with tempfile.TemporaryDirectory(prefix="vmrep-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 1600, timeout: float = 30) -> Path:
    png = Path(png)
    png.unlink(missing_ok=True)
    proc = _run([f"--screenshot={png}", f"--window-size={width},{height}", Path(html).resolve().as_uri()], timeout)
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return png


def dump_dom(html: Path, timeout: float = 30) -> str:
    proc = _run(["--dump-dom", Path(html).resolve().as_uri()], timeout)
    out = proc.stdout.decode("utf-8")
    if proc.returncode != 0 or "<html" not in out:
        raise RuntimeError(f"chromium --dump-dom failed (rc {proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return out


def render(html: Path, png: Path, width: int = 1200, height: int = 1600, timeout: float = 30) -> str:
    """One Chromium run: screenshot to `png` and return the DOM it built (saves a start-up)."""
    png = Path(png)
    png.unlink(missing_ok=True)
    proc = _run(["--dump-dom", f"--screenshot={png}", f"--window-size={width},{height}",
                 Path(html).resolve().as_uri()], timeout)
    out = proc.stdout.decode("utf-8")
    if proc.returncode != 0 or "<html" not in out or not png.exists():
        raise RuntimeError(f"chromium failed (rc {proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return out


def pixel_std(png: Path) -> float:
    """Standard deviation of the screenshot's pixel values (0 for a blank page)."""
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))
    return float(img[..., :3].std())


# --------------------------------------------------------------------------- a small DOM


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list["Element | str"] = field(default_factory=list)
    parent: "Element | None" = None

    @property
    def text(self) -> str:
        parts: list[str] = []
        for c in self.children:
            parts.append(c if isinstance(c, str) else c.text)
        return "".join(parts)

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Element):
                yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list["Element"]:
        """Elements by tag and attribute values (attribute names with '_' for '-')."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        out = []
        for el in self.iter():
            if tag is not None and el.tag != tag:
                continue
            if all((el.attrs.get(k) == v) if v is not True else (k in el.attrs) for k, v in want.items()):
                out.append(el)
        return out

    def find(self, tag: str | None = None, **attrs: str) -> "Element | None":
        found = self.find_all(tag, **attrs)
        return found[0] if found else None

    def field(self, name: str) -> "Element":
        el = self.find(data_field=name)
        if el is None:
            raise KeyError(f"no element with data-field={name!r}")
        return el

    def value(self, name: str) -> str:
        """data-value of the first element with data-field=name."""
        return self.field(name).attrs.get("data-value", "")


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        el = Element(tag, {k: (v if v is not None else "") for k, v in attrs}, parent=self.cur)
        self.cur.children.append(el)
        if tag not in VOID:
            self.cur = el

    def handle_startendtag(self, tag, attrs):
        el = Element(tag, {k: (v if v is not None else "") for k, v in attrs}, parent=self.cur)
        self.cur.children.append(el)

    def handle_endtag(self, tag):
        node = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse(html: str) -> Element:
    b = _Builder()
    b.feed(html)
    b.close()
    return b.root


# --------------------------------------------------------------------------- the Prefect UI


@contextmanager
def served_deployments(config: Path, work: Path, *, user: str = "ui-tester") -> Iterator[dict[str, Any]]:
    """`tests/serving.served` for the UI tests: schedules off, no automation, runs started
    as `user`."""
    from serving import served

    with served(config, work, env={"VMREP_USER": user}) as stack:
        yield stack


from serving import wait_for  # noqa: E402,F401 - the UI tests' condition wait, shared


def launch_chromium(playwright: Any, **kw: Any) -> Any:
    """Debian's Chromium under Playwright (no browser of Playwright's own is downloaded)."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed")
    return playwright.chromium.launch(executable_path=exe, headless=True,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"], **kw)
