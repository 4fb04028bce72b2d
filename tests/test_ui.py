"""The MLflow UI checked the way a person would: a real `mlflow server` on 127.0.0.1 against a store
written by pipeline.track.tracking.Tracker, opened in headless Chromium. Screenshots go to screenshots/."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Flags that keep Chromium quiet on a closed network: without the background-networking ones it
# keeps trying (and failing) to reach Google's hosts.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000")
WAIT_S = 90  # the UI is a large React bundle and this CPU is shared

pytestmark = pytest.mark.skipif(
    not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)),
    reason="Chromium/ChromeDriver not installed (Debian packages chromium and chromium-driver; "
           "`make install` installs them when run as root on a machine with apt-get)")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: pip install -e '.[dev]'")
from selenium.common.exceptions import TimeoutException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

EXP_NAME, PARENT_NAME, MEM_RATIO = "ui-check", "tau-0.5-ui", 0.125


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An experiment as the pipeline writes it: parent run named after the DVC experiment, nested
    model runs with a round/proxy run below, headline metrics and a sample grid on the parent."""
    from pipeline.core.config import parse_params
    from pipeline.core.figures import save_grid
    from pipeline.track.tracking import Tracker

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands in tmp_path
    monkeypatch.setenv("DVC_EXP_NAME", PARENT_NAME)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(parse_params({"tracking": {"uri": uri, "experiment": EXP_NAME}}))
    for model in ("baseline", "iet"):
        run = tracker.child(model)
        proxy = tracker.child("round 1 proxy 1", parent=run)
        tracker.log_curve(proxy, [{"step": s, "loss": 1.0 / (s + 1)} for s in range(5)])
        tracker.finish(proxy)
        tracker.finish(run)
    tracker.log_metrics(tracker.parent_id, {"baseline.mem_ratio": 0.5, "iet.mem_ratio": MEM_RATIO})
    grid = tmp_path / "samples.png"
    save_grid(torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, grid, nrow=4)
    tracker.log_artifact(tracker.parent_id, grid, "iet")
    tracker.finish(tracker.parent_id)
    return uri, tracker.experiment_id, tracker.parent_id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(store, tmp_path):
    uri, experiment_id, parent_id = store
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = (tmp_path / "server.log").open("w")
    # Its own process group: stopping only the parent can leave worker children behind.
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n"
                            f"{(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not answering after {WAIT_S} s:\n"
                            f"{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, experiment_id, parent_id
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait_for_text(driver, *texts, shot: str):
    """Wait until every text is on the page; on timeout save what the page showed and say what was missing."""
    def body():
        return driver.find_element(By.TAG_NAME, "body").text
    try:
        WebDriverWait(driver, WAIT_S).until(lambda d: all(t in body() for t in texts))
    except TimeoutException:
        driver.save_screenshot(str(SHOTS / f"FAILED-{shot}"))
        missing = [t for t in texts if t not in body()]
        pytest.fail(f"{driver.current_url}: not shown after {WAIT_S} s: {missing}; "
                    f"screenshot screenshots/FAILED-{shot}; page text:\n{body()[:2000]}")


def _click_text(driver, text: str):
    """Click the element showing exactly `text`, first dismissing a feature-tour popover ("Got it")
    that may lie over it, as a person would."""
    def attempt(d):
        for tour in d.find_elements(By.XPATH, "//button[normalize-space(.)='Got it']"):
            try:
                tour.click()
            except WebDriverException:
                pass
        for el in d.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']"):
            try:
                el.click()
                return True
            except WebDriverException:
                pass
        return False
    try:
        WebDriverWait(driver, WAIT_S).until(attempt)
    except TimeoutException:
        pytest.fail(f"{driver.current_url}: could not click {text!r} within {WAIT_S} s")


@pytest.mark.slow  # a server and a browser, 20 s: CI runs it (make test-slow)
def test_experiment_runs_metrics_and_sample_grid_are_visible(server, browser):
    base, experiment_id, parent_id = server
    SHOTS.mkdir(exist_ok=True)

    # The experiment opens on MLflow's GenAI overview; its runs are under the "Model training" switch.
    browser.get(f"{base}/#/experiments/{experiment_id}")
    _wait_for_text(browser, EXP_NAME, "Model training", shot="ui_experiment.png")
    _click_text(browser, "Model training")
    _wait_for_text(browser, "Runs", PARENT_NAME, "matching runs", shot="ui_experiment.png")
    assert "baseline" not in browser.find_element(By.TAG_NAME, "body").text  # nested: collapsed
    parent_link = browser.find_element(By.LINK_TEXT, PARENT_NAME)
    parent_link.find_element(By.XPATH, "./ancestor::*[@role='gridcell'][1]//button").click()
    _wait_for_text(browser, "baseline", "iet", shot="ui_experiment.png")
    browser.save_screenshot(str(SHOTS / "ui_experiment.png"))

    # The parent run: headline metric, its nested runs and the DVC experiment tag.
    parent_link = browser.find_element(By.LINK_TEXT, PARENT_NAME)
    parent_link.click()
    _wait_for_text(browser, "iet.mem_ratio", str(MEM_RATIO), "Child runs", "dvc_exp_name", shot="ui_run.png")
    assert parent_id in browser.current_url
    metric = browser.find_element(By.XPATH, "//*[normalize-space(text())='iet.mem_ratio']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", metric)
    browser.save_screenshot(str(SHOTS / "ui_run.png"))

    # The sample grid in the artifact viewer, reached by clicking, and actually decoded by the browser.
    _click_text(browser, "Artifacts")
    _click_text(browser, "iet")
    _click_text(browser, "samples.png")
    _wait_for_text(browser, "iet/samples.png", shot="ui_artifact.png")
    try:
        img = WebDriverWait(browser, WAIT_S).until(lambda d: next(
            (e for e in d.find_elements(By.CSS_SELECTOR, "img[alt='iet/samples.png']")
             if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", e)), None))
    except TimeoutException:
        browser.save_screenshot(str(SHOTS / "FAILED-ui_artifact.png"))
        pytest.fail("the sample grid iet/samples.png was not rendered as an image in the artifact view")
    # save_grid: 4 columns of 8 px + 5 px padding, upscaled x8 = 296 px
    assert browser.execute_script("return arguments[0].naturalWidth", img) == 296
    assert img.is_displayed()
    browser.save_screenshot(str(SHOTS / "ui_artifact.png"))
