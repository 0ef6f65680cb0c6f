"""The try-it page at GET /, driven in headless Chromium (Debian's package) by Playwright, against a real
server: what the page shows equals what the JSON API answers for the same bytes.

Skipped, with the reason, where Playwright or /usr/bin/chromium is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from support.service import assert_problem, write_checkpoint

STATIC = Path(__file__).resolve().parents[1] / "service" / "static"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "small.safetensors"
    # "trained", but after one epoch at chance level: the page must not let the flag read as "usable".
    return write_checkpoint(path, seed=3, epoch=1, val_top1_error=0.999, val_top5_error=0.995)


@pytest.fixture(scope="module")
def server(checkpoint, module_live_service):
    return module_live_service(
        "--threads", "1",
        "--decode-workers", "1",
        "--reload-interval-s", "0.2",  # the last test swaps in an untrained checkpoint
        checkpoint=checkpoint,
    )  # fmt: skip


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]', as make test does)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh tab on the page; any JavaScript error or console error (a CSP violation, say) fails the test."""
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    # Playwright turns file-chooser interception on asynchronously when the first listener arrives; one
    # registered now is in force before any key press (else Enter may open a real, invisible dialog).
    tab.on("filechooser", lambda chooser: None)
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    tab.on("console", lambda message: _is_error(message) and errors.append(f"console: {message.text}"))
    tab.goto(server.url + "/")
    tab.wait_for_function("() => !document.querySelector('#model').textContent.includes('connecting')")
    yield tab
    context.close()
    assert not errors, errors


def _is_error(message) -> bool:
    # Chromium logs every 4xx answer to fetch as "Failed to load resource"; the error tests expect those.
    return message.type == "error" and not message.text.startswith("Failed to load resource")


# What the page shows ------------------------------------------------------------------------------------

CARDS_JS = """cards => cards.map(card => ({
    name: card.querySelector('.filename').textContent,
    state: card.dataset.state,
    bars: [...card.querySelectorAll('.bars li')].map(li => ({
        label: li.querySelector('.label').textContent,
        value: li.querySelector('.value').textContent,
        wnid: li.dataset.wnid,
        score: Number(li.dataset.score),
        width: li.querySelector('.fill').style.width,
    })),
    title: card.querySelector('.status .title')?.textContent ?? null,
    detail: card.querySelector('.status .detail')?.textContent ?? null,
    meta: card.querySelector('.meta').textContent,
}))"""


def settled_cards(page, count: int) -> list[dict]:
    """Wait until ``count`` cards have an answer (bars or an error); return them in page order."""
    page.wait_for_function(
        "n => document.querySelectorAll('.card[data-state=done], .card[data-state=error]').length === n", arg=count
    )
    return page.eval_on_selector_all(".card", CARDS_JS)


def api_answer(api, name: str, data: bytes, content_type: str = "image/jpeg", **params) -> httpx.Response:
    return api.post("/classify", params={"top_k": 5, **params}, files={"file": (name, data, content_type)})


def assert_shows_api_answer(card: dict, api, name: str, data: bytes, **params) -> None:
    """The card's five bars are the API's top-5 for the same bytes: labels, classes and percentages."""
    response = api_answer(api, name, data, **params)
    assert response.status_code == 200, response.text
    predictions = response.json()["results"][0]["predictions"]
    assert card["state"] == "done", card
    assert [b["label"] for b in card["bars"]] == [p["label"] for p in predictions]
    assert [b["wnid"] for b in card["bars"]] == [p["wnid"] for p in predictions]
    for bar, prediction in zip(card["bars"], predictions):
        # The same bytes through the same net; a request batched with others may differ in the last digits.
        assert bar["score"] == pytest.approx(prediction["score"], rel=1e-3, abs=1e-6), (bar, prediction)
        if bar["value"] == "<0.1%":
            assert 0 < 100 * bar["score"] < 0.05, bar
        else:
            assert abs(float(bar["value"].rstrip("%")) - 100 * bar["score"]) <= 0.05 + 1e-9, bar
        assert float(bar["width"].rstrip("%")) == pytest.approx(100 * bar["score"], rel=1e-4, abs=1e-4), bar


def as_png(path: Path) -> bytes:
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").resize((320, 240)).save(buffer, format="PNG")
    return buffer.getvalue()


# Tests --------------------------------------------------------------------------------------------------


def test_page_and_its_files_come_from_the_app(api):
    response = api.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    for name, media_type in [("page.js", "text/javascript"), ("page.css", "text/css"), ("favicon.svg", "image/svg")]:
        asset = api.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
        assert asset.content == (STATIC / name).read_bytes()
    assert_problem(api.get("/static/..%2Fapp.py"), 404)
    assert_problem(api.get("/static/index.htm"), 404)
    # No CDN, no remote font or script: every URL in the page's files is relative.
    for path in STATIC.glob("*.*"):
        text = path.read_text()
        if path.suffix == ".svg":
            text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text), path.name
    assert "/" not in api.get("/openapi.json").json()["paths"]  # the page is not part of the API


def test_chosen_photos_show_the_apis_top5(page, api, photos, checkpoint, tmp_path):
    chosen = [photos[4], photos[8]]  # tabby, banana
    page.set_input_files("#file-input", [str(p) for p in chosen])
    cards = settled_cards(page, 2)
    assert [c["name"] for c in cards] == [p.name for p in chosen]
    for card, path in zip(cards, chosen):
        assert_shows_api_answer(card, api, path.name, path.read_bytes())
        assert f"answered by {checkpoint.name} (epoch 1, val top-1 error 99.9%)" in card["meta"]
        assert " ms on the server" in card["meta"]
    assert page.locator(".card .bars li").first.is_visible()
    assert page.locator("#untrained").is_hidden()
    header = page.locator("#model").inner_text()
    assert checkpoint.name in header and "epoch 1" in header and "val top-5 error 99.5%" in header
    assert page.locator("#model .pill").inner_text() == "trained · val top-1 error 99.9%"
    assert "not a fresh initialisation" in page.locator("#model .pill").get_attribute("title")
    assert page.locator("#announce").get_attribute("aria-live") == "polite"
    assert page.locator("#announce").text_content().startswith(f"{chosen[1].name}: ") or page.locator(
        "#announce"
    ).text_content().startswith(f"{chosen[0].name}: ")

    # 10 patches: the page classifies what it shows again, and still agrees with the API.
    page.select_option("#crops", "ten")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.card')].every(c => c.textContent.includes('10 patches'))"
    )
    for card, path in zip(settled_cards(page, 2), chosen):
        assert_shows_api_answer(card, api, path.name, path.read_bytes(), crops="ten")

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.width == 1200 and image.height >= 400
    print(f"screenshot: {shot}")


def test_conv1_filters_under_the_model_chip(page, api, checkpoint):
    """A collapsible "conv1 filters (paper Fig. 3)" under the model chip: GET /model/filters.png of the model
    being served, loaded (within the Content-Security-Policy), with the towers named."""
    summary = page.locator("#filters summary")
    assert summary.inner_text() == "conv1 filters (paper Fig. 3)"
    chip, box = page.locator("#model").bounding_box(), summary.bounding_box()
    assert box["y"] >= chip["y"] + chip["height"] - 1  # under the chip
    assert page.locator("#filters-image").is_hidden()  # closed until asked for
    summary.click()
    image = page.locator("#filters-image")
    image.wait_for(state="visible")
    page.wait_for_function(
        "() => { const i = document.getElementById('filters-image'); return i.complete && i.naturalWidth > 0; }"
    )
    assert page.locator("#model").bounding_box() == chip  # opening the picture does not move the chip
    assert_tower_labels_fit(page)
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    src = image.get_attribute("src")
    assert src.startswith("model/filters.png") and sha256 in src
    with Image.open(io.BytesIO(api.get("/model/filters.png").content)) as png:
        size = png.size
    assert page.evaluate(
        "() => { const i = document.getElementById('filters-image'); return [i.naturalWidth, i.naturalHeight]; }"
    ) == list(size)
    towers = page.locator("#filters .towers span").all_inner_texts()
    assert [t.strip() for t in towers] == ["tower 0", "tower 1"]
    caption = page.locator("#filters figcaption").inner_text()
    assert "tower 0" in caption and "tower 1" in caption and "above" in caption and "below" in caption
    summary.click()
    assert image.is_hidden()


TOWER_LABELS_JS = """() => [...document.querySelectorAll('#filters .towers span')].map(span => {
    const range = document.createRange();
    range.selectNodeContents(span);
    const text = range.getBoundingClientRect(), block = span.getBoundingClientRect();
    return {lines: range.getClientRects().length, text: text.height, block: block.height};
})"""


def assert_tower_labels_fit(page) -> None:
    """Each tower's label on one line ("tower 0", not "tower / 0"), within its block of the picture."""
    labels = page.evaluate(TOWER_LABELS_JS)
    assert len(labels) == 2
    for label in labels:
        assert label["lines"] == 1 and label["text"] <= label["block"] + 0.5, labels
    image = page.locator("#filters-image").bounding_box()
    assert sum(label["block"] for label in labels) == pytest.approx(image["height"], abs=1), (labels, image)


def test_where_it_looks(page, api, photos):
    """Each answered card has a "Where it looks" button: POST /explain for its image and its top class, the
    overlay (a blob: URL, as the previews are) shown in place of the preview; pressed again, the photo."""
    path = photos[4]
    page.set_input_files("#file-input", str(path))
    (card,) = settled_cards(page, 1)
    top = card["bars"][0]
    button = page.locator(".card .look")
    assert button.inner_text() == "Where it looks" and button.get_attribute("aria-pressed") == "false"
    photo_src = page.locator(".card .preview img").get_attribute("src")
    with page.expect_response(lambda r: "/explain" in r.url) as answer:
        button.click()
    assert answer.value.status == 200 and answer.value.headers["content-type"] == "image/png"
    assert answer.value.headers["x-content-type-options"] == "nosniff"
    assert float(answer.value.headers["x-heatmap-max"]) > 0.5  # a map with a peak
    assert f"class_index={card_index(page)}" in answer.value.url
    page.wait_for_function(
        "() => { const i = document.querySelector('.card .preview img.look-image'); return i && i.complete && i.naturalWidth > 0; }"
    )
    look = page.locator(".card .preview img.look-image")
    assert look.get_attribute("src").startswith("blob:")
    assert page.evaluate("() => document.querySelector('.card .preview img').naturalWidth") == 224
    assert top["label"] in look.get_attribute("alt")
    assert button.get_attribute("aria-pressed") == "true" and button.inner_text() == "Show the photo"
    assert page.locator(".card .look-status").inner_text().startswith(f"evidence for “{top['label']}”")
    legend = page.locator(".card .legend")  # what the colours mean
    assert legend.is_visible() and legend.inner_text().split() == ["no", "evidence", "most", "evidence"]
    # The same picture as the API draws for the same bytes and class.
    expected = api.post(
        "/explain", params={"class_index": card_index(page)}, files={"file": (path.name, path.read_bytes())}
    )
    # (Read back through a canvas: the page's connect-src does not allow fetching blob: URLs.)
    shown = page.evaluate(
        """() => {
            const img = document.querySelector('.card .preview img');
            const canvas = document.createElement('canvas');
            canvas.width = img.naturalWidth;
            canvas.height = img.naturalHeight;
            const context = canvas.getContext('2d');
            context.drawImage(img, 0, 0);
            const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
            return [...rgba.filter((_, i) => i % 4 !== 3)];
        }"""
    )
    with Image.open(io.BytesIO(expected.content)) as png:
        assert bytes(shown) == png.convert("RGB").tobytes()
    button.click()  # back to the photo
    assert page.locator(".card .preview img").get_attribute("src") == photo_src
    assert legend.is_hidden()
    assert page.locator(".card .preview img.look-image").count() == 0
    assert button.get_attribute("aria-pressed") == "false" and button.inner_text() == "Where it looks"
    button.click()  # shown again without another request
    assert page.locator(".card .preview img.look-image").count() == 1


def card_index(page) -> str:
    return page.locator(".card .bars li").first.get_attribute("data-index")


def test_keyboard_drop_and_paste(page, api, photos):
    # Keyboard: Tab reaches the header's filters toggle, then the drop zone, with a visible focus ring;
    # Enter opens the file chooser.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.closest('#filters') !== null")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "drop"
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    assert chooser.value.is_multiple()
    chooser.value.set_files(str(photos[0]))
    (card,) = settled_cards(page, 1)
    assert_shows_api_answer(card, api, photos[0].name, photos[0].read_bytes())

    # A file dropped on the page, and an image pasted from the clipboard (named by the page).
    dropped, pasted = photos[2].read_bytes(), as_png(photos[6])
    page.evaluate(
        """([name, b64, type]) => {
            const data = new DataTransfer();
            data.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type}));
            for (const kind of ['dragenter', 'dragover', 'drop'])
                document.getElementById('drop').dispatchEvent(
                    new DragEvent(kind, {bubbles: true, cancelable: true, dataTransfer: data}));
        }""",
        [photos[2].name, base64.b64encode(dropped).decode(), "image/jpeg"],
    )
    settled_cards(page, 2)
    page.evaluate(
        """([b64]) => {
            const data = new DataTransfer();
            data.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], 'image.png',
                                    {type: 'image/png'}));
            document.dispatchEvent(new ClipboardEvent('paste', {bubbles: true, cancelable: true, clipboardData: data}));
        }""",
        [base64.b64encode(pasted).decode()],
    )
    newest, middle, oldest = settled_cards(page, 3)  # newest first
    assert newest["name"] == "pasted image 1" and middle["name"] == photos[2].name
    assert_shows_api_answer(newest, api, "pasted.png", pasted)
    assert_shows_api_answer(middle, api, photos[2].name, dropped)
    assert oldest == card
    assert page.locator("#announce").text_content().startswith("pasted image 1: ")

    page.click("#clear")
    assert page.locator(".card").count() == 0 and page.evaluate("document.activeElement.id") == "drop"


def test_api_errors_are_shown_in_words(page, api, photos, tmp_path):
    truncated = photos[5].read_bytes()[:600]
    files = [
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image at all"},
        {"name": "cut.jpg", "mimeType": "image/jpeg", "buffer": truncated},
    ]
    page.set_input_files("#file-input", files)
    cards = {card["name"]: card for card in settled_cards(page, 2)}
    for file in files:
        response = api_answer(api, file["name"], file["buffer"], file["mimeType"])
        problem = assert_problem(response, response.status_code)
        assert 400 <= response.status_code < 500
        card = cards[file["name"]]
        assert card["state"] == "error" and card["bars"] == []
        # A headline in words, not the HTTP phrase; the detail as the API gives it, less the file's name
        # (the card's title) and with no "file 1": the page sends one file a request.
        assert card["title"] == HEADLINES[problem["type"]] and card["title"] != problem["title"]
        assert problem["detail"].startswith(f"'{file['name']}': ")
        assert card["detail"] == problem["detail"].removeprefix(f"'{file['name']}': ")
        assert not card["detail"].startswith("file ") and file["name"] not in card["detail"]
    # The browser cannot draw a text file: it is not an image, and the card says so (not "in this browser").
    previews = page.eval_on_selector_all(".card", "cards => cards.map(c => c.querySelector('.preview').innerText)")
    assert "no preview: not an image (text/plain)" in previews
    assert not any("in this browser" in text for text in previews)
    assert page.locator(".card .status .detail").first.is_visible()
    page.screenshot(path=str(tmp_path / "errors.png"))


HEADLINES = {  # what the page says for the problems the two files get
    "urn:alexnet:problem:invalid-image": "Not a readable image",
    "urn:alexnet:problem:unsupported-image": "Not an image format the server reads",
}


def wait_for_model(api, **expected) -> None:
    deadline = time.monotonic() + 30
    while any(api.get("/model").json()["model"][k] != v for k, v in expected.items()):
        assert time.monotonic() < deadline, f"the server did not pick up the new checkpoint ({expected})"
        time.sleep(0.1)


def test_trained_weights_without_a_validation_error_say_so(page, api, checkpoint, photos):
    """Weights that record no validation error (an import of unverified weights, say) are "trained",
    and the page says that nothing tells how good they are."""
    write_checkpoint(checkpoint, seed=5, source="model.import_weights")
    wait_for_model(api, sha256=hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    page.reload()
    page.wait_for_function("() => document.querySelector('#model .pill')")
    assert page.locator("#model .pill").inner_text() == "trained · no validation error recorded"
    assert page.locator("#untrained").is_hidden()
    page.set_input_files("#file-input", str(photos[3]))
    (card,) = settled_cards(page, 1)
    assert f"answered by {checkpoint.name} (no validation error recorded)" in card["meta"]


def test_an_untrained_model_is_flagged(page, api, server, checkpoint, photos, tmp_path):
    """The server hot-reloads an untrained checkpoint: the page warns, in the header and on each answer."""
    write_checkpoint(checkpoint, seed=4, trained=False)
    wait_for_model(api, trained=False)
    page.reload()
    page.wait_for_selector("#untrained", state="visible")
    assert "Untrained model" in page.locator("#untrained").inner_text()
    assert "untrained" in page.locator("#model .pill").inner_text()
    # "how to serve a trained model" is a link, to the steps on this page (the README is not served here).
    how_to = page.locator("#get-a-model")
    assert how_to.is_hidden() and "README" not in page.locator("#untrained").inner_text()
    page.click("#untrained a[href='#get-a-model']")
    assert page.url.endswith("#get-a-model") and how_to.is_visible()
    assert "python -m model.import_weights" in how_to.inner_text() and "ALEXNET_CHECKPOINT=" in how_to.inner_text()
    # This chip (shorter than a trained one's) stays put too when the filters open.
    chip = page.locator("#model").bounding_box()
    page.click("#filters summary")
    page.locator("#filters-image").wait_for(state="visible")
    assert page.locator("#model").bounding_box() == chip
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert sha256 in page.locator("#filters-image").get_attribute("src")  # the new model's kernels
    page.set_input_files("#file-input", str(photos[1]))
    (card,) = settled_cards(page, 1)
    assert_shows_api_answer(card, api, photos[1].name, photos[1].read_bytes())
    assert "untrained: labels are noise" in card["meta"]
    page.screenshot(path=str(tmp_path / "untrained.png"))


def test_a_map_with_no_evidence_says_so(page, api, checkpoint, photos):
    """A net whose conv5 never fires (its biases far below zero) gives every class a Grad-CAM map of 0
    everywhere: the overlay is an even blue tint, and the card says that it means no evidence at all."""
    from model import load_checkpoint

    silent = load_checkpoint(write_checkpoint(checkpoint, seed=6))
    silent.state_dict["conv5.bias"].fill_(-1e4)
    silent.save(checkpoint)
    wait_for_model(api, sha256=hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    page.reload()
    page.set_input_files("#file-input", str(photos[2]))
    (card,) = settled_cards(page, 1)
    with page.expect_response(lambda r: "/explain" in r.url) as answer:
        page.click(".card .look")
    assert answer.value.status == 200 and float(answer.value.headers["x-heatmap-max"]) == 0
    page.wait_for_selector(".card .preview img.look-image")
    status = page.locator(".card .look-status")
    assert status.inner_text().startswith(f"no evidence for “{card['bars'][0]['label']}”")
    assert "0 everywhere" in status.inner_text() and "none" in status.get_attribute("class")
    assert page.locator(".card .legend").is_visible()


def test_docs_work_without_internet(browser, server):
    """/docs with every request to another host refused: Swagger UI comes up from the app's own files,
    lists the operations and runs one ("Try it out"), with no CSP violation or other console error."""
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    elsewhere: list[str] = []

    def only_this_server(route):
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_server)
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    tab.on("console", lambda message: message.type == "error" and errors.append(f"console: {message.text}"))
    try:
        tab.goto(server.url + "/")
        tab.click("text=API documentation")  # the try-it page's link
        tab.wait_for_url(server.url + "/docs")
        classify = tab.locator("#operations-classify-classify_classify_post")
        classify.wait_for(state="visible")
        assert "/classify" in classify.inner_text() and "POST" in classify.inner_text()
        assert "AlexNet classification API" in tab.locator(".info .title").inner_text()
        for path in ("/healthz", "/readyz", "/model", "/metrics"):
            assert tab.locator(f".opblock-summary-path[data-path='{path}']").is_visible(), path
        health = tab.locator("#operations-health-healthz_healthz_get")
        health.locator(".opblock-summary").click()
        health.locator("button.try-out__btn").click()
        health.locator("button.execute").click()
        status = health.locator(".live-responses-table td.response-col_status:not(.col_header)")
        status.wait_for(state="visible")
        assert status.inner_text().strip() == "200"
        assert (
            '"ok"' in health.locator(".live-responses-table td.response-col_description:not(.col_header)").inner_text()
        )
    finally:
        context.close()
    assert not elsewhere, elsewhere
    assert not errors, errors
