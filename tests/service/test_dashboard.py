"""The dashboard in a real headless browser: Debian's chromium driven by Selenium through chromedriver
(both from apt, installed by scripts/setup.sh; nothing is downloaded at test time)."""

from __future__ import annotations

import shutil

import pytest
from pipeline_files import ROOT

from service.serving import LIMIT, READ_TOKEN, TOKEN

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
    browser.find_element(By.ID, "pipeline-limit").send_keys(str(LIMIT))
    browser.find_element(By.ID, "pipeline-start").click()
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

    keep_screenshot(browser, tmp_path / "dashboard-job-page.png")


def test_an_eval_shows_its_leaderboards_and_a_reader_no_controls(eval_server, finished_eval, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))
    stopped = eval_server.submit_eval(limit=1, run_dir="runs/stopped")["id"]  # a job a writer may resume
    eval_server.client().post(f"/api/jobs/{stopped}/cancel")
    assert eval_server.wait_ended(stopped)["status"] == "cancelled"

    browser.get(f"{eval_server.url}/?token={TOKEN}")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#eval option[value='eval.yaml']"))  # the eval form
    assert browser.find_elements(By.ID, "pipeline-form")
    browser.get(f"{eval_server.url}/#/jobs/{stopped}")
    wait.until(lambda d: d.find_elements(By.ID, "resume"))

    browser.get(f"{eval_server.url}/#/jobs/{finished_eval['id']}")
    ratings = finished_eval["ratings"]
    for axis, figures in ratings["axes"].items():
        for model, f in figures["models"].items():
            row = f".leaderboard[data-axis='{axis}'] tr[data-model='{model}'] td"
            cells = wait.until(lambda d: [td.text for td in d.find_elements(By.CSS_SELECTOR, row)])
            assert cells[0] == (f"{model} (baseline)" if model == ratings["baseline"] else model)
            assert cells[1] == f"{f['elo']:.0f} ({f['ci95'][0]:.0f}-{f['ci95'][1]:.0f})"
            assert cells[4] == f"{100 * f['refusal_rate']:.1f}%"
    # the frontier plot through the files endpoint and the cookie, and the link to the full report
    assert wait.until(
        lambda d: d.execute_script(
            "const i = document.getElementById('frontier'); return i && i.complete && i.naturalWidth"
        )
    )
    assert (
        browser.find_element(By.ID, "eval-report")
        .get_attribute("href")
        .endswith(f"/api/jobs/{finished_eval['id']}/files/report.html")
    )
    keep_screenshot(browser, tmp_path / "dashboard-eval-page.png")

    # The read-only token: the same pages without a control its token would be refused.
    browser.delete_all_cookies()
    browser.get(f"{eval_server.url}/?token={READ_TOKEN}")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#jobs tr[data-job-id='{stopped}']"))
    assert not browser.find_elements(By.TAG_NAME, "form")
    browser.get(f"{eval_server.url}/#/jobs/{stopped}")
    wait.until(lambda d: d.find_elements(By.ID, "downloads"))
    assert not browser.find_elements(By.ID, "resume") and not browser.find_elements(By.ID, "cancel")
    browser.get(f"{eval_server.url}/#/jobs/{finished_eval['id']}")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".leaderboard[data-axis='harmless'] tr[data-model='base']"))


def keep_screenshot(browser, path) -> None:
    assert browser.save_screenshot(str(path))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    print(f"screenshot: {ARTIFACTS / path.name}")
