"""The dashboard in a real headless browser: Debian's chromium driven by Selenium through chromedriver
(both from apt, installed by scripts/setup.sh; nothing is downloaded at test time)."""

from __future__ import annotations

import shutil

import pytest
from pipeline_files import ROOT

from service.serving import LIMIT, TOKEN

ARTIFACTS = ROOT / "tests" / "artifacts"  # ignored by git; CI keeps it


@pytest.fixture
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        service=Service(executable_path=chromedriver), options=options
    )  # a path: selenium-manager stays idle
    yield driver
    driver.quit()


def test_job_list_follows_a_submitted_job_to_100_percent(server, reference_job, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    # The pages re-render as progress arrives: an element found a moment ago may be replaced before it is read.
    wait = WebDriverWait(browser, 300, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(f"{server.url}/?token={TOKEN}")  # the link a user is given; the token moves to a cookie
    assert "token" not in browser.current_url
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pipeline option[value='tiny.yaml']"))

    before = {j["id"] for j in server.client().get("/api/jobs").json()}
    Select(browser.find_element(By.ID, "pipeline")).select_by_value("tiny.yaml")
    browser.find_element(By.ID, "limit").send_keys(str(LIMIT))
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: {j["id"] for j in server.client().get("/api/jobs").json()} - before)
    (job_id,) = {j["id"] for j in server.client().get("/api/jobs").json()} - before

    row = f"#jobs tr[data-job-id='{job_id}']"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row))  # the list shows it
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{row} .status").text == "finished")
    bar = wait.until(
        lambda d: (
            d.find_element(By.CSS_SELECTOR, f"{row} .bar").get_attribute("data-fraction"),
            d.find_element(By.CSS_SELECTOR, f"{row} .bar .label").text,
        )
    )
    assert bar == ("1", "100%")

    browser.find_element(By.CSS_SELECTOR, f"{row} a").click()
    wait.until(lambda d: d.find_element(By.ID, "job-status").text == "finished")
    wait.until(lambda d: d.find_elements(By.ID, "report"))
    links = wait.until(lambda d: [a.text for a in d.find_elements(By.CSS_SELECTOR, "#downloads a")])
    assert "datasets.zip (all datasets)" in links and "datasets/sft.jsonl" in links and "report.html" in links
    assert "100%" in wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#job-progress .bar .label").text)
    browser.switch_to.frame(browser.find_element(By.ID, "report"))  # the report with its plots, through the cookie
    wait.until(lambda d: d.find_elements(By.TAG_NAME, "img"))
    assert all(d for d in browser.execute_script("return [...document.images].map(i => i.naturalWidth)"))
    samples = browser.find_elements(
        By.CSS_SELECTOR, ".sample"
    )  # rows as a person reads them: prompt, answer, critique, revision
    assert samples and "round 1 critique" in samples[0].text and "answer → final revision" in samples[0].text
    browser.switch_to.default_content()

    screenshot = tmp_path / "dashboard-job-page.png"
    assert browser.save_screenshot(str(screenshot))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / screenshot.name)
    print(f"screenshot: {ARTIFACTS / screenshot.name}")
