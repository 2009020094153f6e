"""Drives Berth's dashboard in a real browser (Debian's chromium and chromedriver, through
Selenium's WebDriver client), against a cluster that tests/tests/dashboard.rs started.

Signs in, watches an agent become ready and a crashed replica's restart appear without a
reload, stops and starts the agent, queues requests, drops one, retries a dead one (and then
every dead letter of the agent at once), and checks
that a read-only token is shown no action and is refused one anyway. Saves a screenshot of
each page in $SCREENSHOTS. Exits non-zero (with the failed check) on any failure.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

URL = os.environ["DASHBOARD_URL"].rstrip("/")
GATEWAY = os.environ["GATEWAY"]
AGENT = os.environ["AGENT"]
ADMIN_TOKEN = os.environ["ADMIN_TOKEN"]
READ_ONLY_TOKEN = os.environ["READ_ONLY_TOKEN"]
SHOTS = os.environ["SCREENSHOTS"]
BERTH = os.environ["BERTH_BIN"]
MANIFEST = os.environ["MANIFEST"]


def berth(*args):
    out = subprocess.run([BERTH, *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"berth {' '.join(args)}: {out.stderr}")
    return out.stdout


def gateway_post(path, body=b"x"):
    request = urllib.request.Request(f"http://{GATEWAY}{path}", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def shot(browser, name):
    browser.save_screenshot(os.path.join(SHOTS, f"{name}.png"))


def wait(browser, what, check, timeout=90):
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda b: check(b))
    except Exception as e:
        shot(browser, "failed")
        raise AssertionError(f"waited {timeout}s for {what}; page: {browser.current_url}\n"
                             f"{seen(browser)}") from e


def seen(browser):
    """What the page and the CLI showed when a wait gave up, to tell the page from the cluster."""
    page = {s: text_of(browser, s) for s in ["#state", "#ready", "table#replicas", "#request-state"]}
    try:
        cli = berth("get", AGENT)
    except Exception as e:  # the cluster itself may be what failed
        cli = f"berth get {AGENT} failed: {e}"
    return f"the page showed: {page}\nberth get {AGENT}:\n{cli}"


def text_of(browser, selector):
    # Read in one step: live updates replace the page's parts, so a found element can go stale.
    return browser.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : null;",
        selector,
    )


def sign_in(browser, token):
    browser.get(f"{URL}/agents")
    wait(browser, "the sign-in page", lambda b: b.current_url.startswith(f"{URL}/login"))
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "signin").click()
    wait(browser, "the agents page", lambda b: b.current_url.startswith(f"{URL}/agents"))


def marked(browser):
    """Marks the page, so that a reload (which drops the mark) can be told apart."""
    browser.execute_script("window.__berthMark = 1")


def still_marked(browser):
    return browser.execute_script("return window.__berthMark === 1")


def request_state(request_id):
    shown = json.loads(berth("requests", "show", request_id, "-o", "json"))
    return shown.get("state", "")


def main():
    os.makedirs(SHOTS, exist_ok=True)
    options = webdriver.ChromeOptions()
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"]:
        options.add_argument(flag)
    # The test's CA is private; what is checked here is the dashboard, served over that TLS.
    options.accept_insecure_certs = True
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    browser = webdriver.Chrome(service=service, options=options)
    try:
        run(browser)
    finally:
        browser.quit()


def run(browser):
    # Sign in; a wrong token is refused on the page.
    browser.get(f"{URL}/login")
    shot(browser, "login")
    browser.find_element(By.ID, "token").send_keys("not-a-token-0123456789")
    browser.find_element(By.ID, "signin").click()
    wait(browser, "the wrong token refused", lambda b: "Not signed in" in b.page_source)
    sign_in(browser, ADMIN_TOKEN)

    # An agent deployed while the page is open becomes ready on it, with no reload.
    marked(browser)
    berth("apply", "-f", MANIFEST)
    row = f"tr[data-agent='{AGENT}']"
    wait(browser, "the agent listed", lambda b: text_of(b, row) is not None)
    wait(browser, "the agent available, live",
         lambda b: text_of(b, f"{row} [data-state]") == "available" and text_of(b, f"{row} [data-ready]") == "1/1")
    assert still_marked(browser), "the agents page updated without a reload"
    shot(browser, "agents")

    # A crashed replica's restart appears on the agent's page, with no reload.
    browser.get(f"{URL}/agents/{AGENT}")
    wait(browser, "the replica ready", lambda b: text_of(b, "#ready") == "1/1")
    restarts = int(text_of(browser, "[data-restarts]"))
    marked(browser)
    status, _ = gateway_post(f"/agents/{AGENT}/crash")
    assert status == 200, f"crash: {status}"
    wait(browser, "the restart counted, live",
         lambda b: int(text_of(b, "[data-restarts]") or 0) > restarts)
    wait(browser, "the ReplicaRestarted event, live", lambda b: "ReplicaRestarted" in text_of(b, "#events"))
    assert still_marked(browser), "the agent's page updated without a reload"
    assert "<redacted>" in text_of(browser, "#spec"), "secrets are redacted in the spec"
    assert "s3cret" not in browser.page_source
    wait(browser, "ready again", lambda b: text_of(b, "#ready") == "1/1")
    shot(browser, "agent")

    browser.get(f"{URL}/nodes")
    wait(browser, "a ready node", lambda b: "ready" in (text_of(b, "#nodes") or ""))
    shot(browser, "nodes")

    # Stop it from the page: requests are queued now.
    browser.get(f"{URL}/agents/{AGENT}")
    browser.find_element(By.ID, "stop").click()
    wait(browser, "stopped, no replica ready",
         lambda b: text_of(b, "#state") == "stopped" and text_of(b, "#ready").startswith("0/"))
    deadline = time.time() + 30
    while True:
        status, body = gateway_post(f"/agents/{AGENT}/echo", b"drop me")
        if status == 202:
            to_drop = json.loads(body)["request_id"]
            break
        assert time.time() < deadline, f"never queued: {status} {body!r}"
        time.sleep(0.2)
    status, body = gateway_post(f"/agents/{AGENT}/slow?ms=5000", b"too slow")
    assert status == 202, f"queued: {status} {body!r}"
    to_die = json.loads(body)["request_id"]
    status, body = gateway_post(f"/agents/{AGENT}/slow?ms=5000", b"too slow as well")
    assert status == 202, f"queued: {status} {body!r}"
    also_dies = json.loads(body)["request_id"]

    # The queue's page is read when opened (it is not live): reloaded until both show queued.
    browser.get(f"{URL}/requests?agent={AGENT}")
    wait(browser, "all three queued", lambda b: b.refresh() or len(b.find_elements(By.CSS_SELECTOR, "tr[data-state='queued']")) == 3)
    shot(browser, "queue")

    # Drop one from its page.
    browser.get(f"{URL}/requests/{to_drop}")
    shot(browser, "request")
    browser.find_element(By.ID, "drop").click()
    wait(browser, "back on the queue", lambda b: b.current_url == f"{URL}/requests")
    assert to_drop not in browser.page_source, "the dropped request is gone"

    # Start it: the slow requests time out (requestTimeout 1s, maxAttempts 1) and are dead.
    browser.get(f"{URL}/agents/{AGENT}")
    browser.find_element(By.ID, "start").click()
    wait(browser, "started", lambda b: text_of(b, "#state") in ("starting", "available"))
    deadline = time.time() + 90
    while request_state(to_die) != "REQUEST_STATE_DEAD" or request_state(also_dies) != "REQUEST_STATE_DEAD":
        assert time.time() < deadline, "the slow requests were never dead-lettered"
        time.sleep(0.5)
    # Stopped again, a retried request stays queued where the page can show it.
    browser.get(f"{URL}/agents/{AGENT}")
    browser.find_element(By.ID, "stop").click()
    wait(browser, "stopped again, no replica ready",
         lambda b: text_of(b, "#state") == "stopped" and text_of(b, "#ready").startswith("0/"))
    browser.get(f"{URL}/requests/{to_die}")
    assert text_of(browser, "#request-state") == "dead"
    browser.find_element(By.ID, "retry").click()
    wait(browser, "queued again", lambda b: text_of(b, "#request-state") == "queued")
    # The other from the agent's queue, with every dead letter it has: none left dead.
    browser.get(f"{URL}/requests?agent={AGENT}&state=dead")
    assert browser.find_elements(By.CSS_SELECTOR, f"tr[data-request='{also_dies}']"), seen(browser)
    shot(browser, "dead-letters")
    browser.find_element(By.ID, "retry-dead").click()
    wait(browser, "no dead letter left", lambda b: "state=dead" in b.current_url
         and not b.find_elements(By.CSS_SELECTOR, "tr[data-request]"))
    assert request_state(also_dies) == "REQUEST_STATE_QUEUED", request_state(also_dies)

    # Read-only: everything visible, no action shown, and none taken if sent anyway.
    browser.find_element(By.ID, "logout").click()
    sign_in(browser, READ_ONLY_TOKEN)
    for path in ["/agents", f"/agents/{AGENT}", "/nodes", f"/requests?agent={AGENT}", f"/requests/{to_die}"]:
        browser.get(f"{URL}{path}")
        forms = [f.get_attribute("action") for f in browser.find_elements(By.CSS_SELECTOR, "form[method='post']")]
        assert forms == [f"{URL}/logout"], f"{path}: actions shown to a read-only token: {forms}"
        assert not browser.find_elements(By.ID, "actions"), path
    browser.get(f"{URL}/agents/{AGENT}")
    shot(browser, "read-only")
    refused = browser.execute_async_script(
        "const done = arguments[0];"
        f"fetch('/agents/{AGENT}/start', {{method: 'POST', credentials: 'same-origin'}})"
        ".then(r => done(r.status));"
    )
    assert refused == 403, f"a read-only token's action: {refused}"
    assert text_of(browser, "#state") == "stopped", "nothing changed"
    print("dashboard: every check passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"dashboard check failed: {e}", file=sys.stderr)
        sys.exit(1)
