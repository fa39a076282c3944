"""The HTML report: self-contained content checked as text, then behaviour in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest
from test_render_stores import ENTITIES, write_render_study

from medsyn_xai.render import build_report
from medsyn_xai.render.outputs import write_report
from medsyn_xai.render.report import slice_positions

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


class _Collector(HTMLParser):
    """Collects start tags with their attributes and checks that non-void elements close in order."""

    VOID = {"meta", "link", "img", "input", "br", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.open: list[str] = []
        self.scripts: dict[str, str] = {}
        self._script_id: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag not in self.VOID:
            self.open.append(tag)
        if tag == "script":
            self._script_id = attributes.get("id") or ""

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()
        self._script_id = None

    def handle_data(self, data):
        if self._script_id is not None:
            self.scripts[self._script_id] = self.scripts.get(self._script_id, "") + data


def parse(page: str) -> _Collector:
    collector = _Collector()
    collector.feed(page)
    collector.close()
    assert collector.open == [], f"unclosed elements {collector.open}"
    return collector


def png_shape(uri: str) -> tuple[int, ...]:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(uri[len(prefix) :])), format="png").shape


def test_build_report_self_contained(tmp_path):
    store = write_render_study(tmp_path)
    page = build_report(store)
    document = parse(page)

    # Nothing outside the file: no URLs, every image a PNG data URI, no external script or style.
    outside_data = re.sub(r"data:[^\"']*", "", page)
    assert not re.search(r"(https?|ftp|file|wss?):|//", outside_data, flags=re.IGNORECASE)
    for tag, attributes in document.tags:
        for name in ("src", "href"):
            value = attributes.get(name)
            if value is not None:
                assert value.startswith("data:"), (tag, name, value[:40])
    assert "default-src 'none'" in page

    # Prompt spans: one clickable span per entity, classes by label and assertion.
    spans = {int(a["data-entity"]): a["class"] for tag, a in document.tags if tag == "span" and "data-entity" in a}
    assert sorted(spans) == list(range(len(ENTITIES)))
    for index, (_, label, assertion, _) in enumerate(ENTITIES):
        assert f"label-{label}" in spans[index]
        assert f"assert-{assertion}" in spans[index]

    # Viewer data: one overlay and up to 16 slices per entity, the peak slice among them.
    data = json.loads(document.scripts["report-data"])
    assert data["depth"] == 32
    assert len(data["entities"]) == len(ENTITIES)
    for entity in data["entities"]:
        assert png_shape(entity["overlay"]) == (520, 1500, 4)
        assert 1 <= len(entity["slices"]) == len(entity["z"]) <= 16
        assert entity["z"][entity["start"]] == entity["voxel"][0]
        assert png_shape(entity["slices"][0])[2] in (3, 4)

    # Joint table: 3 findings x 2 body parts; provenance values shown.
    pair_rows = re.search(r'<table id="pair-table">.*?</table>', page, flags=re.DOTALL).group(0)
    assert pair_rows.count("<tr>") == 1 + 3 * 2
    attrs = store.attrs
    for value in ("ab" * 32, "medsyn-tiny", "ddim", "minilm", attrs["software_version"], attrs["created_at"]):
        assert value in page
    assert ">7<" in page  # seed
    assert page.count('id="token-chart"') == 1


def test_build_report_escapes_prompt(tmp_path):
    prompt = "Nodule <b>in</b> the right upper lobe & no effusion."
    specs = [
        ("Nodule", "FINDING", "present", (0.5, 0.5, 0.5)),
        ("right upper lobe", "BODY_PART", "present", (0.5, 0.5, 0.5)),
    ]
    store = write_render_study(tmp_path, specs=specs, prompt=prompt)
    page = build_report(store)
    parse(page)
    assert "&lt;b&gt;in&lt;/b&gt;" in page
    assert "&amp; no effusion" in page
    assert "<b>" not in page


@pytest.mark.parametrize("explained", [True, False])
def test_build_report_without_entities(tmp_path, explained):
    store = write_render_study(tmp_path, specs=[], explained=explained)
    page = build_report(store)
    document = parse(page)
    assert 'id="no-entities"' in page
    assert ("found no entities" in page) if explained else ("run &#x27;medsyn-xai explain&#x27;" in page)
    assert json.loads(document.scripts["report-data"])["entities"] == []
    assert 'id="token-chart"' in page
    assert "ab" * 32 in page


def test_slice_positions_include_peak():
    positions, start = slice_positions(64, 37, 16)
    assert len(positions) == 16
    assert positions[0] == 0
    assert positions[-1] == 63
    assert positions[start] == 37
    assert positions == sorted(set(positions))
    assert slice_positions(5, 2, 16) == ([0, 1, 2, 3, 4], 2)


@pytest.fixture()
def chromium(tmp_path):
    """Headless Chromium through the system chromedriver; Selenium Manager never runs."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(f"headless browser test needs {' and '.join(missing)} (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1600,1200",
    ):
        options.add_argument(argument)
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def test_report_browser_entities_and_slices(tmp_path, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    store = write_render_study(tmp_path / "root")
    path = write_report(store, tmp_path / "report.html")
    chromium.get(path.resolve().as_uri())
    assert severe(chromium) == []

    overlay = chromium.find_element(By.ID, "overlay")
    first_overlay = overlay.get_attribute("src")
    assert first_overlay.startswith("data:image/png;base64,")
    heading = chromium.find_element(By.ID, "entity-heading")
    assert heading.text.startswith("nodule (FINDING, present)")

    # Clicking the absent entity in the prompt swaps the overlay.
    chromium.find_element(By.CSS_SELECTOR, '#prompt span[data-entity="2"]').click()
    assert overlay.get_attribute("src") != first_overlay
    assert heading.text.startswith("pleural effusion (FINDING, absent)")
    assert "selected" in chromium.find_element(By.CSS_SELECTOR, '#prompt span[data-entity="2"]').get_attribute("class")

    # Clicking an entity in the table works too.
    chromium.find_element(By.CSS_SELECTOR, '#entity-table button[data-entity="4"]').click()
    assert heading.text.startswith("left lower lobe (BODY_PART, present)")

    # Moving the slider swaps the axial slice image and its label.
    slider = chromium.find_element(By.ID, "slice-slider")
    slice_image = chromium.find_element(By.ID, "slice-image")
    label = chromium.find_element(By.ID, "slice-label")
    before_src, before_label = slice_image.get_attribute("src"), label.text
    slider.send_keys(Keys.ARROW_RIGHT if int(slider.get_attribute("value")) == 0 else Keys.ARROW_LEFT)
    assert slice_image.get_attribute("src") != before_src
    assert label.text != before_label
    assert label.text.startswith("z = ")
    assert severe(chromium) == []


def test_report_browser_without_entities(tmp_path, chromium):
    from selenium.webdriver.common.by import By

    store = write_render_study(tmp_path / "root", specs=[])
    path = write_report(store, tmp_path / "empty.html")
    chromium.get(path.resolve().as_uri())
    assert "No entities" in chromium.find_element(By.ID, "no-entities").text
    assert chromium.find_element(By.ID, "token-chart").get_attribute("naturalWidth") == "1500"
    assert severe(chromium) == []
