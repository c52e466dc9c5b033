"""The review console in a real browser (Debian's headless chromium driven by Selenium) against the shared
platform's gateway: a radiologist signs in with a key, finds the steps of a pipeline report produced in the
same test, edits one finding, accepts the other with the keyboard; a cardiologist in the same browser cannot
see or open them; CSRF, cookie attributes and logout are checked where they take effect."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from medserve.console.sessions import COOKIE
from medserve.digests import sha256_hex
from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord, ConsoleSession, Review
from tests.series_data import BONE_ROI, MUSCLE_ROI, ct_series, multipart

from .conftest import Platform, json_of, new_patient_id

pytestmark = pytest.mark.slow

CT_PIPELINE = "/v1/pipelines/ct-opportunistic-screen/studies"


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"{names[0]} is not installed (apt-get install -y chromium chromium-driver; .ci/run does)")


@pytest.fixture
def browser():
    options = Options()
    options.binary_location = _binary("chromium", "chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                     "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=_binary("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    driver.implicitly_wait(5)  # a clicked form's next page: find_element waits for it
    yield driver
    driver.quit()


def _sign_in(driver, base_url: str, key: str) -> None:
    driver.get(f"{base_url}/console/login")
    driver.find_element(By.ID, "api_key").send_keys(key)
    driver.find_element(By.ID, "sign-in").click()
    _wait_title(driver, "Review queue")


def _wait_title(driver, text: str) -> None:
    WebDriverWait(driver, 10).until(lambda d: text in d.title, message=f"title never said {text!r}")


def _count(driver) -> int:
    return int(re.match(r"\((\d+)\) Review queue", driver.title).group(1))


def _report(platform: Platform) -> dict:
    body, content_type = multipart(ct_series(4), json.dumps(
        {"rois": {"bone": {**BONE_ROI, "z": [0, 4]}, "liver": {**MUSCLE_ROI, "z": [1, 3]}}}).encode())
    with platform.client(platform.key("clinical-app", department="radiology")) as app:
        response = app.post(CT_PIPELINE, content=body,
                            headers={"Content-Type": content_type, "X-Patient-Id": new_patient_id()})
    report = json_of(response)
    assert response.status_code == 200, report
    return report


def test_radiologist_signs_off_a_pipeline_report_in_the_browser_and_cardiology_cannot_see_it(
        platform: Platform, browser, tmp_path: Path):
    base = platform.base_url
    report = _report(platform)
    steps = {finding["step"]: finding["inference_id"] for finding in report["findings"]}
    bone, liver = steps["bone"], steps["liver"]

    _sign_in(browser, base, platform.key("clinician", department="radiology"))
    cookie = browser.get_cookie(COOKIE)
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    before = _count(browser)
    listed = {a.get_attribute("data-id") for a in browser.find_elements(By.CSS_SELECTOR, "a.open")}
    assert {bone, liver} <= listed and before >= 2
    browser.save_screenshot(str(tmp_path / "console-queue.png"))

    browser.find_element(By.CSS_SELECTOR, f'a.open[data-id="{bone}"]').click()
    page = browser.find_element(By.ID, "findings").text
    bone_version = next(f["model_version"] for f in report["findings"] if f["step"] == "bone")
    assert bone_version in page and bone in page  # model version and audit id shown
    assert "never stores DICOM" in browser.find_element(By.ID, "preview").text
    browser.save_screenshot(str(tmp_path / "console-result.png"))
    fits = "return document.documentElement.scrollWidth <= window.innerWidth"
    assert browser.execute_script(fits)  # 1280 x 800: nothing scrolls sideways
    browser.set_window_size(800, 1180)  # a tablet held upright
    assert browser.execute_script(fits)
    browser.save_screenshot(str(tmp_path / "console-result-tablet.png"))
    browser.set_window_size(1280, 800)
    browser.find_element(By.ID, "label").send_keys("osteopenia")
    browser.find_element(By.ID, "comment").send_keys("trabecular HU below threshold on review")
    browser.find_element(By.ID, "edit").click()
    assert browser.find_element(By.ID, "notice").text == "Signed off: edit."
    assert browser.find_element(By.ID, "status").text == "amended"

    browser.get(f"{base}/console/results/{liver}")
    browser.find_element(By.TAG_NAME, "body").send_keys("a")  # the keyboard shortcut accepts
    assert browser.find_element(By.ID, "notice").text == "Signed off: accept."
    browser.get(f"{base}/console")
    assert _count(browser) == before - 2
    assert bone not in browser.page_source and liver not in browser.page_source

    with session_scope(platform.database_url) as session:
        (signed_in,) = session.scalars(select(ConsoleSession).where(
            ConsoleSession.token_sha256 == sha256_hex(cookie["value"])))
        reviews = {str(r.inference_id): r for r in session.scalars(
            select(Review).where(Review.inference_id.in_([uuid.UUID(bone), uuid.UUID(liver)])))}
        assert {k: r.decision for k, r in reviews.items()} == {bone: "edit", liver: "accept"}
        assert reviews[bone].corrected_finding["label"] == "osteopenia"
        for review in reviews.values():
            assert (review.via, review.session_id) == ("console", signed_in.id)
            decision = session.get(AuditRecord, review.audit_id)  # the decision's audit record
            assert (decision.operation, decision.outcome, decision.department) == ("review.decision", "ok", "radiology")
            assert session.get(AuditRecord, review.inference_id).operation == "pipeline.step"

    # A form post without the session's CSRF token is refused, even with the session's cookie.
    with httpx.Client(base_url=base, cookies={COOKIE: cookie["value"]}, timeout=30) as raw:
        forged = raw.post(f"/console/results/{bone}/decision", data={"decision": "reject", "comment": "x"})
        assert forged.status_code == 403 and 'data-code="csrf_token_invalid"' in forged.text

    browser.find_element(By.ID, "logout").click()
    _wait_title(browser, "Sign in")
    with httpx.Client(base_url=base, cookies={COOKIE: cookie["value"]}, timeout=30) as raw:
        old = raw.get("/console", follow_redirects=False)
        assert old.status_code == 303 and old.headers["location"].startswith("/console/login")
    with session_scope(platform.database_url) as session:
        assert session.get(ConsoleSession, signed_in.id) is None

    # Same browser, a cardiologist: neither the queue nor the direct address shows the radiology result.
    _sign_in(browser, base, platform.key("clinician", department="cardiology"))
    assert bone not in browser.page_source
    browser.get(f"{base}/console/results/{bone}")
    assert browser.title.startswith("403 permission_denied")
    assert browser.find_element(By.ID, "error").get_attribute("data-code") == "permission_denied"
    digest = hashlib.sha256(bone.encode()).hexdigest()
    deadline = time.monotonic() + 10
    while True:
        with session_scope(platform.database_url) as session:
            views = list(session.scalars(select(AuditRecord).where(
                AuditRecord.operation == "console.view", AuditRecord.input_sha256 == digest,
                AuditRecord.department == "cardiology")))
        if views or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(v.outcome, v.http_status) for v in views] == [("denied", 403)]
