"""`imgflow serve` in a real browser: Debian's Chromium driven by Playwright, over the output
of a real `imgflow run --once` (the session fixture ``search_run``), the server a real
subprocess as a user starts it."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from imgflow.process import terminate
from tests.search_fixtures import IMGFLOW, ROOT

CHROMIUM = "/usr/bin/chromium"
DOCS_SHOT = ROOT / "docs" / "serve.png"
# Paths that would name a file if the server took paths: each must be refused, with no content.
TRAVERSALS = [
    "/image/../../etc/passwd",
    "/image/..%2F..%2Fetc%2Fpasswd",
    "/thumb/%2e%2e%2fetc%2fpasswd",
    "/thumb/%2e%2e/%2e%2e/etc/passwd",
    "/image//etc/passwd",
    "/image/%2Fetc%2Fpasswd",
    "/thumb/....//....//etc/passwd",
    "/image/%252e%252e%252fetc%252fpasswd",
    "/image/..\\..\\etc\\passwd",
    "/item/..%2f..%2fetc%2fpasswd",
    "/image/file:%2F%2F%2Fetc%2Fpasswd",
    "/static/../../../../etc/passwd",
    "/style.css/../../etc/passwd",
]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].strip("/"))

    def get(self, path: str) -> tuple[int, dict, bytes]:
        """``path`` sent exactly as written: no client-side normalisation of dots or escapes."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        terminate(self.proc, 20)


def start_server(search_run, log: Path, *args: str, **env: str) -> Server:
    """`imgflow serve --port 0 ...`, its URL read from what it prints."""
    out = log.open("w")
    proc = subprocess.Popen(
        [*IMGFLOW, "serve", "--port", "0", *args], cwd=ROOT, env={**search_run.env(), **env}, stdout=out, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"on (http://127\.0\.0\.1:\d+/)", log.read_text())
        if found:
            return Server(proc, found.group(1).rstrip("/"), log)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"imgflow serve did not start:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(search_run, tmp_path_factory):
    srv = start_server(search_run, tmp_path_factory.mktemp("serve") / "serve.log")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text(), srv.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: make test installs it (Makefile target chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    yield page
    context.close()


def names(page) -> list[str]:
    return [Path(p).name for p in page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.path)")]


def wait_for_images(page, timeout: float = 30) -> None:
    """Every image of the page loaded (polled from here: the page's CSP allows no eval, which
    Playwright's wait_for_function needs)."""
    deadline = time.monotonic() + timeout
    while not page.eval_on_selector_all("img", "is => is.every(i => i.complete)"):
        assert time.monotonic() < deadline, "images still loading"
        time.sleep(0.1)


def search(page, query: str) -> float:
    """Type the query in the search box and submit, as a user does; seconds until the page is shown."""
    page.fill("input[name=q]", query)
    started = time.monotonic()
    with page.expect_navigation():
        page.click("button[type=submit]")
    page.wait_for_selector(".card, #message")
    return time.monotonic() - started


def test_the_page_shows_every_image_with_its_thumbnail(page, server):
    started = time.monotonic()
    page.goto(server.url + "/")
    shown = names(page)
    assert {
        "chelsea_cat.png",
        "chelsea_mirrored.jpg",
        "coffee.jpg",
        "astronaut.jpg",
        "rocket.jpg",
        "harbor_ticket.png",
        "open_sign.png",
        "markup_sign.png",
    } == set(shown)  # broken.jpg: no result row
    wait_for_images(page)
    widths = page.eval_on_selector_all(".card img", "is => is.map(i => i.naturalWidth)")
    assert len(widths) == len(shown) and all(w > 0 for w in widths)  # every thumbnail decoded
    print(f"page with {len(shown)} thumbnails loaded in {time.monotonic() - started:.2f} s")
    ticket = page.locator(".card", has_text="harbor_ticket.png")
    assert "HARBOR TICKET 2041" in ticket.locator(".read-text").inner_text()  # the read text
    assert ticket.locator(".cat").inner_text() and ticket.locator(".keywords li").count() > 0
    assert page.locator("#failed-link").inner_text() == "1 failed"
    # the selects are filled from the index: every category of the run, and the run
    categories = page.eval_on_selector_all("select[name=category] option", "os => os.map(o => o.value)")
    assert {"animal", "drink", "sign"} <= set(categories)
    assert page.eval_on_selector_all("select[name=run] option", "os => os.map(o => o.value)") == ["live"]


# The cat and its mirrored copy have the same description: either may come first.
@pytest.mark.parametrize(
    "query, expected", [("a cat", {"chelsea_cat.png", "chelsea_mirrored.jpg"}), ("coffee", {"coffee.jpg"}), ("HARBOR", {"harbor_ticket.png"})]
)
def test_a_search_puts_its_subject_first(page, server, query, expected, tmp_path):
    page.goto(server.url + "/")
    seconds = search(page, query)
    assert set(names(page)[: len(expected)]) == expected
    print(f"search {query!r}: page in {seconds:.2f} s")
    if query == "a cat":
        # The README's picture; `IMGFLOW_WRITE_DOCS=1` writes docs/serve.png (committed), else a temp file.
        wait_for_images(page)
        shot = DOCS_SHOT if os.environ.get("IMGFLOW_WRITE_DOCS") else tmp_path / "serve.png"
        shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        with Image.open(shot) as img:  # 256 colours: a third of the size, no visible difference
            img.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(shot, optimize=True)


def test_a_category_filter(page, server):
    page.goto(server.url + "/")
    page.select_option("select[name=category]", "sign")
    search(page, "a shop")
    assert set(names(page)) <= {"open_sign.png", "markup_sign.png", "harbor_ticket.png"} and names(page)
    assert page.locator("select[name=category] option[selected]").get_attribute("value") == "sign"


def test_more_like_this_and_the_full_row(page, server):
    page.goto(server.url + "/?q=a+cat")
    cat = page.locator(".card", has_text="chelsea_cat.png")
    with page.expect_navigation():
        cat.locator("a.like").click()
    shown = names(page)
    assert shown[0] == "chelsea_mirrored.jpg" and "chelsea_cat.png" not in shown and len(shown) >= 3
    with page.expect_navigation():
        page.locator(".card").first.locator("img").click()
    row = page.inner_text("#row")
    for column in ("event_id", "source_uri", "description", "keywords", "llama_extracted", "models", "source_offset", "text_vector", "word2vec_vector"):
        assert column in row
    assert re.search(r"image_vector\s+1280-d, norm \d+\.\d{4}: \[-?\d+\.\d{4}, ", row)
    assert re.search(r"text_vector\s+384-d, norm 1\.0000", row)
    assert "chelsea_mirrored.jpg" in row


def test_markup_read_from_an_image_is_shown_as_text(page, server):
    page.goto(server.url + "/?q=BOLD")
    card = page.locator(".card", has_text="markup_sign.png")
    assert "<b>BOLD</b> & <i>" in card.locator(".read-text").inner_text()  # the literal characters, visible
    assert page.locator("main b, main i, main script").count() == 0  # no element made of them
    status, _, body = server.get("/?q=BOLD")
    assert status == 200 and b"&lt;b&gt;BOLD&lt;/b&gt; &amp; &lt;i&gt;" in body and b"<b>BOLD" not in body
    page.goto(server.url + "/?q=" + "%3Cscript%3Ealert(1)%3C%2Fscript%3E")  # the query is echoed as text too
    assert page.locator("script").count() == 0
    assert page.input_value("input[name=q]") == "<script>alert(1)</script>"


def test_the_failed_images_with_their_errors(page, server):
    page.goto(server.url + "/")
    with page.expect_navigation():
        page.click("#failed-link")
    failed = page.inner_text("#failed")
    assert "broken.jpg" in failed and "vision: not an image or unsupported format (31 bytes)" in failed
    with page.expect_navigation():
        page.click("#failed a")  # its row: the error row's columns
    assert "failed_stage" in page.inner_text("#row") and "vision" in page.inner_text("#row")
    wait_for_images(page)
    assert page.locator(".item img").evaluate("i => i.naturalWidth > 0")  # the placeholder


def test_no_file_is_served_by_a_path(page, server, search_run):
    image = search_run.images / "coffee.jpg"
    spellings = TRAVERSALS + [
        f"/image/{image}",
        f"/thumb/{image}",
        f"/image/{image.name}",
        "/image/" + str(image).replace("/", "%2F"),
        "/image/file://" + str(image),
    ]
    passwd = Path("/etc/passwd").read_bytes()[:40]
    coffee = image.read_bytes()[:4000]
    for path in spellings:
        status, headers, body = server.get(path)
        assert status in (400, 404), (path, status)
        assert passwd not in body and coffee not in body and b"root:" not in body, path
    for path in TRAVERSALS[:4]:  # and as a browser sends them (it normalises the dots first)
        response = page.goto(server.url + path)
        assert response.status in (400, 404) and "root:" not in page.content(), path


def test_images_only_by_event_id_and_only_from_allowed_places(server, search_run, tmp_path):
    _, _, home = server.get("/")
    ids = re.findall(rb'data-event-id="([0-9a-f]+)"', home)
    assert ids
    status, headers, body = server.get(f"/image/{ids[0].decode()}")
    assert status == 200 and headers["content-type"] in ("image/png", "image/jpeg")
    assert headers["x-content-type-options"] == "nosniff" and "script-src" not in headers["content-security-policy"]
    assert server.get("/thumb/" + "0" * 32)[0] == 404  # an id that is not in the index
    # the same rows, the run's folder not allowed: the page loads, no image is read
    other = start_server(search_run, tmp_path / "serve.log", IMGFLOW_ALLOWED_ROOTS=json.dumps([str(tmp_path)]))
    try:
        status, headers, body = other.get(f"/image/{ids[0].decode()}")
        assert status == 200 and headers["content-type"] == "image/svg+xml" and b"not available" in body
        assert other.get(f"/thumb/{ids[0].decode()}")[2].startswith(b"<svg")
    finally:
        other.stop()
    assert "Traceback" not in other.log.read_text()


def test_an_empty_output_says_so_then_follows_the_sink(page, search_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    srv = start_server(search_run, tmp_path / "serve.log", "--out", str(out), IMGFLOW_SEARCH__SYNC_INTERVAL_S="0.5")
    try:
        page.goto(srv.url + "/")
        assert "no results yet" in page.inner_text("#message")
        assert page.goto(srv.url + "/failed").status == 200
        # the sink completes batches: Avro files first, then their _index objects (what makes them complete)
        shutil.copytree(search_run.out / "avro", out / "avro")
        shutil.copytree(search_run.out / "_index", out / "_index")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not json.loads(srv.get("/api/status")[2])["runs"]:
            time.sleep(0.3)
        page.goto(srv.url + "/")
        assert "coffee.jpg" in names(page)
    finally:
        srv.stop()
    assert "Traceback" not in srv.log.read_text()


def test_the_json_api(server):
    status, headers, body = server.get("/api/search?q=coffee&limit=3")
    hits = json.loads(body)["hits"]
    assert status == 200 and headers["content-type"] == "application/json"
    assert len(hits) == 3 and Path(hits[0]["image_path"]).name == "coffee.jpg"
    status, _, body = server.get(f"/api/row/{hits[0]['event_id']}")
    assert status == 200 and len(json.loads(body)["image_vector"]) == 1280
    status, _, body = server.get("/api/search?q=a&category=nonesuch")
    assert status == 400 and "no image of run 'live' has category 'nonesuch'" in json.loads(body)["error"]


def test_serve_errors_are_one_line(search_run, server):
    missing = search_run.imgflow("serve", "--out", "/nonexistent/out", "--port", "0")
    assert missing.returncode == 2 and "error: no sink output at /nonexistent/out" in missing.stderr
    busy = search_run.imgflow("serve", "--port", str(server.port))
    assert busy.returncode == 2 and f"port {server.port} on 127.0.0.1 is in use" in busy.stderr
    for proc in (missing, busy):
        assert "Traceback" not in proc.stdout + proc.stderr
