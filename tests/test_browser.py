"""An annotator in a real browser (Debian's headless Chromium driven by Selenium, no
browser download): logs in, opens the project's labelling stream, gets push's rank 1 with
its image rendered and the model's guess pre-selected, picks a class, submits; pull then
has that label. The screenshot lands in the test's output folder."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.test_labelstudio import (  # noqa: F401 - pool_predictions is a fixture
    MINORITY,
    capture_store,
    pool_predictions,
    project_for,
    tasks_of,
)
from visionloop.labeling import server
from visionloop.labeling.pull import pull
from visionloop.labeling.push import PushOptions, push

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
README_SCREENSHOT = Path(__file__).parent.parent / "bench" / "results" / "annotator-view.png"


@pytest.fixture
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, f"{missing} not installed: run `make setup` (Debian chromium, driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 60.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} did not appear within {timeout:.0f}s")


def rendered_image_width(driver) -> int:
    """The labelling image's natural width once it has loaded, else 0."""
    return driver.execute_script(
        "const imgs = Array.from(document.querySelectorAll('img'))"
        "  .filter(i => i.src.startsWith('blob:') || i.src.includes('/data/'));"
        "return imgs.length && imgs[0].complete ? imgs[0].naturalWidth : 0;")


def checked_choices(driver) -> list[str]:
    return [box.get_attribute("name") for box in
            driver.find_elements(By.CSS_SELECTOR, "input.ant-checkbox-input:checked")]


def test_an_annotator_labels_push_rank_1_in_a_real_browser(
        browser, labelstudio, trained_version, pool_predictions, tmp_path):  # noqa: F811
    root = capture_store(labelstudio, "browser", pool_predictions[:8])
    client, manifest, project = project_for(labelstudio, trained_version, "browser test")
    pushed = push(root, client, project, manifest.name, MINORITY, PushOptions(budget=3),
                  files_root=labelstudio.files_root)
    rank_1 = next(t for t in tasks_of(client, project) if t.id == pushed.task_ids[0])
    guess = rank_1.data["predicted"]

    browser.get(f"{labelstudio.url}/user/login/")
    browser.find_element(By.NAME, "email").send_keys(labelstudio.username)
    browser.find_element(By.NAME, "password").send_keys(
        server.credentials(labelstudio)["password"])
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(lambda: "/user/login" not in browser.current_url, what="the logged-in page")

    browser.get(f"{labelstudio.url}/projects/{project.id}/data?labeling=1")
    width = wait_for(lambda: rendered_image_width(browser), what="the task's image")
    screenshot = tmp_path / "annotator-view.png"
    browser.save_screenshot(str(screenshot))
    if os.environ.get("VISIONLOOP_KEEP_SCREENSHOT") == "1":  # refresh the README's copy
        shutil.copyfile(screenshot, README_SCREENSHOT)
    # the enlarged display copy (labeling.display: x3), not the 28 px capture
    assert width == 3 * 28 and screenshot.stat().st_size > 0
    assert checked_choices(browser) == [guess]  # the model's guess, pre-selected

    answer = next(c for c in manifest.classes if c != guess)
    browser.find_element(By.CSS_SELECTOR, f"input[name='{answer}']").click()
    wait_for(lambda: checked_choices(browser) == [answer], 10, what="the annotator's pick")
    browser.find_element(By.CSS_SELECTOR, "button[name=submit]").click()
    # the annotation lands on the task the stream showed: push's rank 1
    wait_for(lambda: any(t.total_annotations for t in tasks_of(client, project)), 30,
             what="the submitted annotation")
    assert [t.id for t in tasks_of(client, project) if t.total_annotations] == [rank_1.id]

    labels = tmp_path / "labels"
    assert pull(labels, root, client, project).added == 1
    (labelled,) = [p for p in (labels / "images").rglob("*") if p.is_file()]
    assert labelled.parent.name == answer and labelled.stem == rank_1.data["capture_sha"]
    print(f"\nbrowser: task {rank_1.id} (push's rank 1) shown, image {width} px wide, guess "
          f"{guess!r} pre-selected, answered {answer!r}; screenshot {screenshot}")

