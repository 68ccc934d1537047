"""The engine's web console in a real browser (issue 21): headless Chromium from
Debian's packages, driven by selenium, against a real engine process and real
agent processes on loopback.

* every page renders (hosts, tasks, one task with its output, jobs, the
  connection matrix), with a screenshot of each kept in the test's tmp dir;
* a task started on an agent directly (its Unix socket, as curl would) appears
  in the open tasks page without a reload, and its progress bar moves;
* a kill -9'd agent turns its host red in the open hosts page within the bound;
* a cancel from the page (with its confirmation) cancels the real task;
* a read-role user sees no action buttons, and a forged action POST is refused
  by the server (the task keeps running); a cross-site or tokenless POST too;
* an accessibility smoke check: every input has a label, every button a name.

Chromium and chromedriver are stopped by PID (the driver's process tree) even
when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.engine_process import EngineProcess
from tests.engine_support import Fleet, fleet
from tests.support import until

pytestmark = [pytest.mark.slow, pytest.mark.tool("chromium"),
              pytest.mark.tool("chromedriver")]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

BIN = Path(sys.executable).parent
ENGINE = str(BIN / "vdsm-engine")
ROOT = Path(__file__).resolve().parent.parent
DOCS_IMAGE = ROOT / "docs" / "images" / "console-tasks.png"
# How long a killed agent may take to show red in an open page: the engine's own
# detection (the flags below: two failed attempts, 0.2-1 s apart) plus the
# console's scan (0.2 s) and the page's coalescing (0.1 s).
RED_WITHIN = 4.0


def post_form(engine: EngineProcess, fields: dict[str, str], **headers: str) -> tuple[int, str]:
    body = urllib.parse.urlencode(fields).encode()
    status, _, data = engine.request("POST", "/console/action", body, {
        "Content-Type": "application/x-www-form-urlencoded", **headers})
    return status, data.decode()


def add_hosts(engine: EngineProcess, agents: Fleet) -> None:
    for agent in agents:
        engine.call("addHost", f"name={agent.name}", f"url={agent.url}")
    for agent in agents:
        until(lambda name=agent.name: engine.call("getHost", f"name={name}")["status"] == "up",
              timeout=20, interval=0.2)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three agents; an admin engine over all of them, and a read engine (the same
    hosts, added while it ran as admin, then restarted with the read role)."""
    root = tmp_path_factory.mktemp("console")
    with fleet(root / "agents", 3) as agents:
        admin = EngineProcess(root / "admin")
        reader = EngineProcess(root / "reader")
        (root / "admin").mkdir()
        (root / "reader").mkdir()
        try:
            admin.start("admin")
            reader.start("admin")
            add_hosts(admin, agents)
            add_hosts(reader, agents)
            reader.stop()
            reader.start("read")
            yield {"admin": admin, "reader": reader, "agents": agents, "root": root}
        finally:
            admin.stop()
            reader.stop()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,900", "--no-first-run", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver",
                      log_output=str(profile / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    pids = _tree(service.process.pid)
    try:
        yield driver
    finally:
        pids += _tree(service.process.pid)
        with contextlib.suppress(Exception):
            driver.quit()
        for process in pids:  # whatever quit left behind, by PID
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(pids, timeout=10)


@pytest.fixture
def shots(tmp_path: Path, browser: Any) -> Any:
    def shoot(name: str) -> Path:
        path = tmp_path / f"{name}.png"
        browser.save_screenshot(str(path))
        return path
    return shoot


def start_sleep(agent: Any, **params: Any) -> str:
    """A task started on the agent itself (its Unix socket, as root with curl would)."""
    return str(agent.call("startTask", kind="test.sleep", params=params)["taskID"])


def agent_state(agent: Any, task_id: str) -> str:
    return str(agent.call("getTask", taskID=task_id)["state"])


def row_of(browser: Any, task_id: str) -> dict[str, Any] | None:
    """The task's row as the page shows it now, read in one step (live updates
    replace rows, so an element found earlier may be gone)."""
    return browser.execute_script(
        "for (const tr of document.querySelectorAll('#rows tr')) {"
        "  if (tr.textContent.includes(arguments[0])) {"
        "    const bar = tr.querySelector('progress'), pct = tr.querySelector('.pct');"
        "    return {text: tr.textContent, state: tr.dataset.state,"
        "            progress: bar ? bar.value : null, pct: pct ? pct.textContent : ''}; } }"
        "return null;", task_id[:8])


def progress_of(browser: Any, task_id: str) -> float:
    row = row_of(browser, task_id)
    return float(row["progress"]) if row and row["progress"] is not None else -1.0


def heading(browser: Any) -> str:
    """The page's heading (None while the browser is between pages)."""
    try:
        return str(browser.execute_script(
            "const h = document.querySelector('main h2'); return h ? h.textContent : ''"))
    except StaleElementReferenceException:
        return ""


def click(browser: Any, css: str) -> None:
    """Click what ``css`` finds, again if a live update replaced it meanwhile."""
    def clicked() -> bool:
        try:
            browser.find_element(By.CSS_SELECTOR, css).click()
        except StaleElementReferenceException:
            return False
        return True
    until(clicked, timeout=5, what=f"a click on {css}")


def wait_live(browser: Any) -> None:
    until(lambda: browser.execute_script("return document.body.dataset.connected") == "yes",
          timeout=10, what="the page's event stream")
    browser.execute_script("window.notReloaded = true;")


# -- pages ------------------------------------------------------------------------------------


def test_pages_render_with_hosts_tasks_jobs_and_the_matrix(world, browser, shots):
    admin = world["admin"]
    job = admin.call("startTask", "host=host1", "kind=test.sleep",
                     'params:={"seconds": 30, "printEvery": 0.2}')
    task_id = job["steps"][0]["taskID"]
    share = world["root"] / "share"
    share.mkdir(exist_ok=True)
    admin.call("manageStorageConnection", "hosts:=[\"host1\",\"host2\"]",
               f"uri=file://{share}", "connectionID=share-1")
    try:
        browser.get(admin.base + "/console/")
        assert browser.find_element(By.TAG_NAME, "h2").text == "Hosts"
        statuses = {row.find_element(By.TAG_NAME, "th").text: row.get_attribute("data-status")
                    for row in browser.find_elements(By.CSS_SELECTOR, "#rows tr")}
        assert statuses == {"host1": "up", "host2": "up", "host3": "up"}
        shots("hosts")

        browser.get(admin.base + "/console/tasks")
        until(lambda: row_of(browser, task_id) is not None, timeout=10)
        assert "test.sleep" in row_of(browser, task_id)["text"]
        shots("tasks")

        browser.get(f"{admin.base}/console/tasks/host1/{task_id}")
        until(lambda: "slept" in browser.find_element(By.ID, "output").text, timeout=10,
              what="the task's output followed in the page")
        shots("task")

        browser.get(admin.base + "/console/jobs")
        text = browser.find_element(By.ID, "jobs").text
        assert "startTask" in text
        assert "host1" in text
        shots("jobs")

        browser.get(admin.base + "/console/connections")
        until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "td.cell.h-connected")) == 2,
              timeout=15, interval=0.2, what="two connected cells, live")
        cell = browser.find_elements(By.CSS_SELECTOR, "td.cell.h-connected")[0]
        assert "share-1 on host" in cell.get_attribute("title")
        shots("connections")
        # The same page as curl sees it: plain HTML, no script needed for the lists.
        status, _headers, body = admin.get("/console/connections")
        assert status == 200
        assert "share-1" in body.decode()
    finally:
        admin.call("cancelTask", "host=host1", f"taskID={task_id}")


def test_get_root_is_the_console_for_a_browser_and_text_for_curl(world, browser):
    admin = world["admin"]
    browser.get(admin.base + "/")
    assert browser.find_element(By.TAG_NAME, "h2").text == "Hosts"
    status, headers, body = admin.get("/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert body.decode().startswith("vdsm-engine ")


# -- live --------------------------------------------------------------------------------------


def test_a_task_started_on_an_agent_appears_and_its_progress_moves(world, browser, shots):
    admin, agent = world["admin"], world["agents"][1]
    # Filtered: the new row is added because it matches the page's filters.
    browser.get(admin.base + "/console/tasks?kind=test.sleep&external=yes")
    wait_live(browser)
    task_id = start_sleep(agent, seconds=6, printEvery=0.5)
    try:
        until(lambda: row_of(browser, task_id) is not None, timeout=5,
              what="the new task's row, pushed to the open page")
        first = until(lambda: progress_of(browser, task_id) > 0 and progress_of(browser,
                                                                                 task_id),
                      timeout=5, what="a progress bar")
        later = until(lambda: progress_of(browser, task_id) >= first + 10 and progress_of(
            browser, task_id), timeout=8, what="the progress bar moving")
        assert later > first
        row = until(lambda: "/s" in (row_of(browser, task_id) or {}).get("pct", "")
                    and row_of(browser, task_id), timeout=5, what="its rate")
        assert "yes" in row["text"]  # external: started on the agent, not by the engine
        # The count follows the rows added (the filter's tasks all fit on the page).
        count, rows = browser.execute_script(
            "return [document.getElementById('count').textContent,"
            " document.querySelectorAll('#rows tr').length]")
        assert count.startswith(f"{rows} task"), (count, rows)
        assert browser.execute_script("return window.notReloaded") is True
        # Patched, not redrawn: the row's arrival and the bar's move at least (a loaded
        # machine coalesces more changes into each patch).
        assert int(browser.execute_script("return document.body.dataset.patches")) >= 2
        shots("tasks-live")
        if os.environ.get("CONSOLE_DOCS_SCREENSHOT"):
            browser.save_screenshot(str(DOCS_IMAGE))
    finally:
        with contextlib.suppress(Exception):
            agent.call("cancelTask", taskID=task_id)


def test_cancel_from_the_page_cancels_the_real_task(world, browser, shots):
    admin, agent = world["admin"], world["agents"][1]
    task_id = start_sleep(agent, seconds=60)
    browser.get(admin.base + "/console/tasks?host=host2")
    until(lambda: row_of(browser, task_id) is not None, timeout=10)
    click(browser, f'button.cancel[aria-label="Cancel task {task_id} on host host2"]')
    # The confirmation: nothing is canceled yet.
    until(lambda: heading(browser) == "Please confirm", timeout=5,
          what="the confirmation page")
    assert task_id in browser.find_element(By.CSS_SELECTOR, "form.confirm").text
    shots("confirm")
    assert agent_state(agent, task_id) == "running"
    browser.find_element(By.CSS_SELECTOR, "form.confirm button").click()
    until(lambda: agent_state(agent, task_id) == "canceled", timeout=10,
          what="the real task canceled")
    assert browser.current_url.endswith("/console/tasks?host=host2&page=1")
    until(lambda: (row_of(browser, task_id) or {}).get("state") == "canceled", timeout=5)


def test_maintenance_and_connections_from_the_page(world, browser, shots):
    admin, agents = world["admin"], world["agents"]
    browser.get(admin.base + "/console/")
    click(browser, 'button[aria-label="Start maintenance of host host2"]')
    until(lambda: heading(browser) == "Please confirm", timeout=5)
    click(browser, "form.confirm button")
    until(lambda: admin.call("getHost", "name=host2")["status"] == "maintenance", timeout=10)
    until(lambda: browser.execute_script(
        "const b = document.querySelector('button[aria-label=\"Stop maintenance of host host2\"]');"
        "return b !== null"), timeout=5, what="the host's row in maintenance")
    shots("maintenance")
    click(browser, 'button[aria-label="Stop maintenance of host host2"]')  # not destructive
    until(lambda: admin.call("getHost", "name=host2")["status"] == "up", timeout=15)

    share = world["root"] / "web-share"
    share.mkdir(exist_ok=True)
    browser.get(admin.base + "/console/connections")
    browser.find_element(By.ID, "m-id").send_keys("web-1")
    browser.find_element(By.ID, "m-uri").send_keys(f"file://{share}")
    browser.find_element(By.ID, "m-hosts").send_keys("host1,host2")
    click(browser, "form.manage button")
    for agent in agents.agents[:2]:
        until(lambda agent=agent: "web-1" in agent.call("getStorageConnectionList"),
              timeout=15, what="the connection managed on the host")
    cell = 'td.cell[title^="web-1 on host1: connected"]'
    until(lambda: browser.find_elements(By.CSS_SELECTOR, cell), timeout=10,
          what="the new connection's cells in the open matrix")
    click(browser, 'button[aria-label="Unmanage connection web-1 on its hosts"]')
    until(lambda: heading(browser) == "Please confirm", timeout=5)
    click(browser, "form.confirm button")
    for agent in agents.agents[:2]:
        until(lambda agent=agent: "web-1" not in agent.call("getStorageConnectionList"),
              timeout=15, what="the connection unmanaged on the host")


def test_a_killed_agent_turns_its_host_red_within_the_bound(world, browser, shots):
    admin, agent = world["admin"], world["agents"][2]
    # A task running there, its row open in another tab: it must turn unknown.
    task_id = start_sleep(agent, seconds=120)
    browser.get(admin.base + "/console/tasks?host=host3")
    until(lambda: (row_of(browser, task_id) or {}).get("state") == "running", timeout=10)
    wait_live(browser)
    tasks_tab = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get(admin.base + "/console/")
    wait_live(browser)
    row = "#" + browser.execute_script("return document.querySelector('#rows tr:nth-child(3)').id")
    def status_of() -> str:
        return str(browser.execute_script(
            "return document.querySelector(arguments[0]).dataset.status", row))
    assert status_of() == "up"
    killed = time.monotonic()
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(timeout=10)
    until(lambda: status_of() == "non-responsive", timeout=RED_WITHIN + 5, interval=0.02)
    took = time.monotonic() - killed
    colour, title = browser.execute_script(
        "const el = document.querySelector(arguments[0] + ' .status');"
        "return [getComputedStyle(el).backgroundColor, el.title];", row)
    shots("host-down")
    print(f"host3 red in the open page {took:.2f} s after kill -9")
    assert took < RED_WITHIN, took
    assert colour in ("rgba(179, 0, 27, 1)", "rgb(179, 0, 27)"), colour
    assert browser.execute_script("return window.notReloaded") is True
    assert title  # the last error, on hover
    hosts_tab = browser.current_window_handle
    browser.switch_to.window(tasks_tab)
    until(lambda: (row_of(browser, task_id) or {}).get("state") == "unknown", timeout=3,
          what="the down host's task unknown in the open tasks page")
    assert browser.execute_script("return window.notReloaded") is True
    browser.switch_to.window(hosts_tab)
    browser.close()
    browser.switch_to.window(tasks_tab)


# -- who may do what ---------------------------------------------------------------------------


def test_a_read_role_sees_no_actions_and_a_forged_action_is_refused(world, browser, shots):
    admin, reader, agent = world["admin"], world["reader"], world["agents"][0]
    task_id = start_sleep(agent, seconds=60)
    try:
        for path in ("/console/", "/console/tasks", "/console/jobs", "/console/connections"):
            browser.get(reader.base + path)
            assert browser.find_element(By.ID, "role").text == "read"
            assert browser.find_elements(By.CSS_SELECTOR, "form[method=post]") == []
            assert browser.find_elements(By.CSS_SELECTOR, "button.action") == []
        browser.get(reader.base + "/console/tasks")
        until(lambda: row_of(browser, task_id) is not None, timeout=10)
        shots("read-role")
        # A forged POST by the read user: refused by the server for the role.
        forged = {"action": "cancel", "host": "host1", "task": task_id, "confirm": "yes",
                  "token": "0" * 64}
        status, body = post_form(reader, forged)
        assert status == 403
        assert "your role is read; cancelTask needs operate" in body
        # Another site's form, and a form without its token, to the admin's console.
        status, body = post_form(admin, forged, Origin="http://evil.example")
        assert status == 403
        assert "evil.example" in body
        status, body = post_form(admin, forged)
        assert status == 403
        assert "token" in body
        assert agent_state(agent, task_id) == "running"
    finally:
        agent.call("cancelTask", taskID=task_id)


@pytest.mark.parametrize(("fields", "status", "said"), [
    ({"action": "cancel", "host": "host1", "task": "not-a-task"}, 400, "taskID"),
    ({"action": "cancel", "host": "nohost", "task": "0" * 8 + "-0000-4000-8000-" + "0" * 12},
     409, "nohost"),
    ({"action": "maintenance-off", "host": ""}, 400, "params.name"),
    ({"action": "manage", "connection": "x/y", "uri": "file:///nowhere", "hosts": "host1"},
     400, "connectionID"),
    ({"action": "launch-missiles"}, 400, "Unknown action"),
])
def test_bad_action_input_is_refused_in_words(world, fields, status, said):
    """Each refusal is a page that says why (no traceback, no HTTP 500), and changes nothing."""
    admin = world["admin"]
    _, _, page = admin.get("/console/connections")
    token = re.search(r'name="token" value="([0-9a-f]{64})"', page.decode()).group(1)
    got, body = post_form(admin, {**fields, "token": token, "confirm": "yes"})
    assert got == status, body
    assert said in body
    assert "Traceback" not in body


# -- accessibility -----------------------------------------------------------------------------

A11Y = r"""
const problems = [];
if (!document.documentElement.lang) problems.push('html has no lang');
for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
  const label = el.id && document.querySelector('label[for="' + el.id + '"]');
  if (!label && !el.getAttribute('aria-label')) problems.push('unlabelled ' + el.outerHTML);
}
for (const el of document.querySelectorAll('button, a[href]')) {
  const name = el.getAttribute('aria-label') || el.textContent.trim();
  if (!name) problems.push('nameless ' + el.outerHTML);
}
for (const el of document.querySelectorAll('progress')) {
  if (!el.getAttribute('aria-label')) problems.push('unlabelled progress');
}
for (const t of document.querySelectorAll('table')) {
  if (!t.querySelector('caption')) problems.push('table without caption');
}
// Contrast of every element's own text against the first opaque background behind it.
function rgb(text) { return text.match(/[\d.]+/g).map(Number); }
function luminance(c) {
  const [r, g, b] = c.slice(0, 3).map(v => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}
function background(el) {
  for (; el; el = el.parentElement) {
    const c = rgb(getComputedStyle(el).backgroundColor);
    if (c.length < 4 || c[3] > 0) return c;
  }
  return [255, 255, 255];
}
for (const el of document.querySelectorAll('body *')) {
  const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
  if (!own || !el.offsetParent) continue;
  const [a, b] = [luminance(rgb(getComputedStyle(el).color)), luminance(background(el))];
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  if (ratio < 4.5) problems.push('contrast ' + ratio.toFixed(2) + ' ' + el.outerHTML.slice(0, 80));
}
return problems;
"""


def test_accessibility_smoke(world, browser):
    admin, agent = world["admin"], world["agents"][0]
    task_id = start_sleep(agent, seconds=20)
    try:
        until(lambda: admin.get(f"/console/tasks/host1/{task_id}")[0] == 200, timeout=10)
        for path in ("/console/", "/console/tasks", f"/console/tasks/host1/{task_id}",
                     "/console/jobs", "/console/connections"):
            browser.get(admin.base + path)
            assert browser.execute_script(A11Y) == [], path
        # Keyboard: the first Tab reaches the skip link.
        browser.find_element(By.TAG_NAME, "body").send_keys("\ue004")
        assert browser.switch_to.active_element.text == "Skip to content"
    finally:
        agent.call("cancelTask", taskID=task_id)
