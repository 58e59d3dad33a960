"""The dashboard in a real headless browser: Debian's chromium driven by Selenium through chromedriver
(both from apt, installed by scripts/setup.sh; nothing is downloaded at test time)."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
from pipeline_files import ROOT

from service.labeling_files import LABELERS, age_assignment, label_run_pairs
from service.serving import LIMIT, READ_TOKEN, TOKEN

ARTIFACTS = ROOT / "tests" / "artifacts"  # ignored by git; CI keeps it


def chrome():
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
    return webdriver.Chrome(
        service=Service(executable_path=chromedriver), options=options
    )  # a path: selenium-manager stays idle


@pytest.fixture
def browser():
    driver = chrome()
    yield driver
    driver.quit()


@pytest.fixture
def second_browser():
    """Another person's browser, with its own cookies."""
    driver = chrome()
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
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#train-kind option[value='sft']"))  # trainings too

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

    # The row browser: each row's whole story, filtered by its text; then side by side with another run.
    wait.until(lambda d: d.find_element(By.ID, "rows-info").text == f"{LIMIT} found")
    stories = browser.find_elements(By.CSS_SELECTOR, "#rows-list details.row")
    assert len(stories) == LIMIT
    stories[0].find_element(By.TAG_NAME, "summary").click()
    assert "round 1 critique" in stories[0].text and "round 1 revision" in stories[0].text
    prompt = server.client().get(f"/api/jobs/{job_id}/rows?limit=1").json()["rows"][0]["messages"][-1]["content"]
    matching = server.client().get(f"/api/jobs/{job_id}/rows", params={"q": prompt}).json()["total"]
    assert 1 <= matching < LIMIT
    browser.find_element(By.ID, "rows-q").send_keys(prompt)
    browser.find_element(By.ID, "rows-search").click()
    wait.until(lambda d: d.find_element(By.ID, "rows-info").text == f"{matching} found")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#rows-list details.row")) == matching
    Select(browser.find_element(By.ID, "compare-with")).select_by_value(str(reference_job[0]["id"]))
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda d: d.find_element(By.ID, "pair-rows-info").text == f"{LIMIT} found")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#pair-rows-list .side-by-side")) == LIMIT
    cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#compare-table tr:nth-child(2) td")]
    assert cells == [str(LIMIT), str(LIMIT)]  # rows in each run
    keep_screenshot(browser, tmp_path / "dashboard-compare.png")


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


def test_labelers_label_with_the_keyboard_and_hostile_text_stays_text(label_server, browser, second_browser, tmp_path):
    """The operator creates a task in the form; two labelers in two browsers label it at once with keys
    1/2/3/0 (a note on one pair) through pairs holding <script>, <img onerror> and javascript: links;
    then the operator and a reader read a task's live agreement figures."""
    from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def waiting(driver):
        return WebDriverWait(driver, 60, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))

    wait = waiting(browser)
    browser.get(f"{label_server.url}/?token={TOKEN}")
    browser.get(f"{label_server.url}/#/tasks")
    wait.until(lambda d: d.find_elements(By.ID, "task-form"))
    for field, value in (("name", "keyboard"), ("source", "pairs.jsonl"), ("labelers", "alice, bob"), ("hold", "90")):
        browser.find_element(By.ID, f"task-{field}").send_keys(value)
    overlap = browser.find_element(By.ID, "task-overlap")
    overlap.clear()
    overlap.send_keys("1")
    before = {t["id"] for t in label_server.client().get("/api/tasks").json()}
    browser.find_element(By.ID, "task-create").click()
    wait.until(lambda d: {t["id"] for t in label_server.client().get("/api/tasks").json()} - before)
    (task_id,) = {t["id"] for t in label_server.client().get("/api/tasks").json()} - before
    assert label_server.client().get(f"/api/tasks/{task_id}").json()["hold_s"] == 90 * 60

    browser.delete_all_cookies()
    labelers = {"alice": browser, "bob": second_browser}
    for name, driver in labelers.items():
        driver.get(f"{label_server.url}/?token={LABELERS[name]}")  # a labeler's home: its tasks
        link = f"#tasks tr[data-task-id='{task_id}'] a.label-link"
        waiting(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, link))
        assert not driver.find_elements(By.TAG_NAME, "form") and not driver.find_elements(
            By.CSS_SELECTOR, "a.figures-link"
        )
        driver.find_element(By.CSS_SELECTOR, link).click()
    keys = {"alice": "1230", "bob": "213"}  # bob never skips: what alice skips comes to him
    pressed, hostile_seen, turns = {}, set(), Counter()
    while True:  # turn about, until neither has a pair left
        progressed = False
        for name, driver in labelers.items():
            shown = waiting(driver).until(
                lambda d: (
                    d.find_elements(By.ID, "no-more") or d.find_elements(By.CSS_SELECTOR, ".answers[data-assignment]")
                )
            )[0]
            if shown.get_attribute("id") == "no-more":
                continue
            assignment = shown.get_attribute("data-assignment")
            assert assignment not in pressed
            text = driver.find_element(By.ID, "pair").text
            hostile_seen.update(m for m in ("<script>", "<img src=x onerror=", 'href="javascript:') if m in text)
            if name == "alice" and turns[name] == 1:
                driver.find_element(By.ID, "note").send_keys("too close to call", Keys.ESCAPE)
            if "<script>" in text:
                keep_screenshot(driver, tmp_path / "dashboard-labeling.png")
            pressed[assignment] = (name, keys[name][turns[name] % len(keys[name])])
            turns[name] += 1
            driver.find_element(By.TAG_NAME, "body").send_keys(pressed[assignment][1])
            waiting(driver).until(
                lambda d: (
                    d.find_elements(By.ID, "no-more")
                    or d.find_element(By.CSS_SELECTOR, ".answers").get_attribute("data-assignment") != assignment
                )
            )
            progressed = True
        if not progressed:
            break
        for driver in labelers.values():  # a pair the other skipped may have come free since: ask again
            if driver.find_elements(By.ID, "no-more"):
                driver.refresh()
    assert hostile_seen == {"<script>", "<img src=x onerror=", 'href="javascript:'}  # shown as the model wrote them
    for driver in labelers.values():
        assert driver.execute_script("return window.__xss === undefined")
        assert not driver.find_elements(By.CSS_SELECTOR, "#view img, a[href^='javascript']")
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text

    answers = label_server.client().get(f"/api/tasks/{task_id}/labels").json()
    assert {str(a["assignment"]) for a in answers} == set(pressed)
    labelled = Counter(a["pair"] for a in answers if a["label"] != "skip")
    assert len(labelled) == 12 and set(labelled.values()) == {1}  # each pair once: the overlap, never beyond
    assert {a["labeler"] for a in answers if a["label"] != "skip"} == {"alice", "bob"}
    for a in answers:  # key 1: the left answer, the pair's first (`a`) unless it was shown swapped
        name, key = pressed[str(a["assignment"])]
        assert a["labeler"] == name
        assert a["label"] == {"1": "ba"[not a["swapped"]], "2": "ab"[not a["swapped"]], "3": "tie", "0": "skip"}[key]
    assert [a["note"] for a in answers if a["note"]] == ["too close to call"]
    assert Counter(a["swapped"] for a in answers)[True] not in (0, len(answers))  # both orders shown

    # Live figures: two labelers on a run's pairs, then the operator's and a reader's view.
    run = label_server.client().post("/api/tasks", json={"name": "run", "source": "runs/judged", "overlap": 2}).json()
    for who in ("alice", "bob"):
        label_run_pairs(label_server, run["id"], who)
    browser.delete_all_cookies()
    browser.get(f"{label_server.url}/?token={TOKEN}")
    browser.get(f"{label_server.url}/#/tasks/{run['id']}")
    figure = lambda key: wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"tr[data-figure='{key}'] td").text)  # noqa: E731
    assert figure("percent") == "50.0%" and figure("fleiss") == "0.158" and figure("cohen:alice|bob") == "0.273"
    overall = wait.until(
        lambda d: [
            td.text for td in d.find_elements(By.CSS_SELECTOR, "#judge-figures tr[data-principle='all principles'] td")
        ]
    )
    assert overall[1] == "2" and overall[2].startswith("50.0%")
    assert browser.find_element(By.CSS_SELECTOR, "#disagreements li").get_attribute("data-pair")
    assert browser.find_elements(By.ID, "export-form")
    keep_screenshot(browser, tmp_path / "dashboard-agreement.png")
    browser.delete_all_cookies()
    browser.get(f"{label_server.url}/?token={READ_TOKEN}")
    browser.get(f"{label_server.url}/#/tasks/{run['id']}")
    assert figure("percent") == "50.0%"
    assert not browser.find_elements(By.ID, "export-form")


def test_a_label_sent_after_the_hold_ran_out_moves_the_page_on(label_server, browser):
    """The pair on a labeler's page went to someone else when its hold ran out: the key press is refused
    with the reason, and the page shows the next pair instead of staying on the lost one."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    body = {"name": "lapsed", "source": "pairs.jsonl", "limit": 2, "labelers": ["alice", "bob"]}
    task = label_server.client().post("/api/tasks", json=body).json()
    wait = WebDriverWait(browser, 60, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(f"{label_server.url}/?token={LABELERS['alice']}")
    browser.get(f"{label_server.url}/#/tasks/{task['id']}/label")
    shown = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".answers[data-assignment]"))
    lost = shown[0].get_attribute("data-assignment")
    age_assignment(label_server, int(lost), 61)
    assert label_server.client(LABELERS["bob"]).post(f"/api/tasks/{task['id']}/next").status_code == 200
    browser.find_element(By.TAG_NAME, "body").send_keys("1")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".answers").get_attribute("data-assignment") != lost)
    assert "past its task's hold" in browser.find_element(By.ID, "label-error").text
    assert label_server.client().get(f"/api/tasks/{task['id']}/labels").json() == []


def keep_screenshot(browser, path) -> None:
    assert browser.save_screenshot(str(path))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    print(f"screenshot: {ARTIFACTS / path.name}")
