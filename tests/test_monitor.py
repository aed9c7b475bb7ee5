"""``insitu monitor`` (issue 16 item 2): modules in supervised subprocesses (a module killed
mid-request, a hung one, the restart limit, a stream's order across a restart), the token off
loopback, and the page in Debian's headless chromium during a real run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, finish_sim, run_name, start_sim
from tests.test_consumers import head_stats, start_ana

pytestmark = pytest.mark.cluster

PROBE = "probe=tests.monitor.probe_module:setup@" + ",".join(
    ("/api/probe/pid", "/api/probe/slow", "/api/probe/hang", "/api/probe/stream")
)


class Monitor:
    """An ``insitu monitor`` subprocess, its URL and (off loopback) its token."""

    def __init__(self, cluster: Any, run: str, *args: str, env: dict[str, str] | None = None) -> None:
        full = {**os.environ, **cluster.environment(), "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "insitu", "monitor", "--run", run, "--port", "0", *args],
                                     env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)  # fmt: skip
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        match = re.search(r"at (http://\S+/)", first)
        assert match, (first, self._stderr())
        self.url, self.token = match.group(1), None
        if "--host" in args:
            second = self.proc.stdout.readline()
            self.token = re.search(r"\?token=(\S+) ", second).group(1)  # type: ignore[union-attr]

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read() if self.proc.stderr else ""

    def get(self, path: str, timeout: float = 60, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        """Status, body and headers of one GET (the token as a bearer header when there is one)."""
        hdrs = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        req = urllib.request.Request(self.url.rstrip("/") + path, headers={**hdrs, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers

    def modules(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in json.loads(self.get("/api/modules")[1])["modules"]}

    def wait_module(self, name: str, state: str, incarnation: int, timeout: float = 60) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self.modules()[name]
            if (m["state"], m["incarnation"]) == (state, incarnation):
                return m
            time.sleep(0.1)
        raise AssertionError(f"module {name} not {state} as incarnation {incarnation}: {self.modules()[name]}")

    def stop(self) -> str:
        """SIGTERM; the monitor's stderr (its log). Its module processes must be gone."""
        pids = [m["pid"] for m in self.modules().values()] if self.proc.poll() is None else []
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err[-3000:]
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid
        return err


def _events(mon: Monitor, last_id: str, out: list[tuple[str, str, str]], count: int) -> None:
    """Read the probe stream (after ``last_id``) into ``out`` as (event, id, data) until it ends or ``count``."""
    hdrs = {"Authorization": f"Bearer {mon.token}"} if mon.token else {}
    if last_id:
        hdrs["Last-Event-ID"] = last_id
    req = urllib.request.Request(mon.url + "api/probe/stream", headers=hdrs)
    with urllib.request.urlopen(req, timeout=60) as resp:
        fields: dict[str, str] = {}
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line:
                key, _, value = line.partition(": ")
                fields[key] = value
                continue
            if "event" in fields:
                out.append((fields["event"], fields.get("id", ""), fields.get("data", "")))
                if fields["event"] == "error" or len(out) >= count:
                    return
            fields = {}


def _in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    return thread, result


def test_supervised_modules_killed_hung_and_given_up_with_streams_in_order(cluster: Any) -> None:
    """Off loopback (token): a module SIGKILLed mid-request answers that request 503 with the reason
    and ends its stream with an error event, restarts as incarnation 2, the stream resumes after its
    last id; a hung module is found by its heartbeat and restarted; after the limit, 503 for good."""
    mon = Monitor(cluster, run_name("monmod"), "--host", "0.0.0.0", "--module", PROBE,
                  env={"INSITU_MONITOR_HEALTH_INTERVAL": "0.2", "INSITU_MONITOR_HEARTBEAT_DEADLINE": "1.5",
                       "INSITU_MONITOR_MAX_RESTARTS": "2"})  # fmt: skip
    try:
        # the token: refused without it or with a wrong one, accepted as ?token= (which sets a cookie)
        token, mon.token = mon.token, None
        assert mon.get("/api/modules")[0] == 401
        assert mon.get("/api/modules", headers={"Authorization": "Bearer wrong"})[0] == 401
        code, _, headers = mon.get(f"/api/modules?token={token}")
        assert code == 200 and f"insitu_token={token}" in headers["Set-Cookie"]
        assert mon.get("/api/modules", headers={"Cookie": f"insitu_token={token}"})[0] == 200
        mon.token = token
        first = json.loads(mon.get("/api/probe/pid")[1])["pid"]
        stream: list[tuple[str, str, str]] = []
        reader, _ = _in_thread(_events, mon, "", stream, 10_000)
        slow, answer = _in_thread(mon.get, "/api/probe/slow?seconds=60")
        end = time.monotonic() + 30
        while (len(stream) < 5 or mon.modules()["probe"]["in_flight"] < 2) and time.monotonic() < end:
            time.sleep(0.05)
        os.kill(first, signal.SIGKILL)
        slow.join(30)
        reader.join(30)
        code, body, _ = answer[0]
        reason = body.decode()
        assert code == 503 and f"module probe (incarnation 1, pid {first}) killed by SIGKILL" in reason, reason
        assert stream[-1][0] == "error" and "killed by SIGKILL" in stream[-1][2], stream[-3:]
        ticks = [int(i) for e, i, _ in stream if e == "tick"]
        assert ticks == list(range(1, len(ticks) + 1)) and len(ticks) >= 5
        second = json.loads(mon.get("/api/probe/pid")[1])["pid"]  # waits for the restart
        assert second != first and mon.wait_module("probe", "healthy", 2)["restarts"] == 1
        more: list[tuple[str, str, str]] = []
        _events(mon, str(ticks[-1]), more, 5)  # the client reconnects with Last-Event-ID
        assert [int(i) for _, i, _ in more] == list(range(ticks[-1] + 1, ticks[-1] + 6))
        assert {int(d) for _, _, d in more} == {second}

        # hung: its event loop never answers the heartbeat
        code, body, _ = mon.get("/api/probe/hang", timeout=60)
        assert code == 503 and "(incarnation 2" in body.decode() and "hung" in body.decode(), body
        assert mon.wait_module("probe", "healthy", 3)["restarts"] == 2

        # the limit: a third failure is final
        os.kill(json.loads(mon.get("/api/probe/pid")[1])["pid"], signal.SIGKILL)
        mon.wait_module("probe", "gave-up", 3)
        code, body, _ = mon.get("/api/probe/pid")
        assert code == 503 and "not restarted after 2 restarts" in body.decode(), body
        assert mon.modules()["status"]["state"] == "healthy"  # the others are not affected
    finally:
        log = mon.stop()
    assert "killed by SIGKILL; its last log lines:" in log, log[-3000:]
    assert token not in log  # requests are never logged


def _chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


@pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs Debian's chromium and chromium-driver")
def test_the_page_shows_a_live_run_in_chromium(cluster: Any, tmp_path: Path) -> None:
    """The monitor starts before the run; the page's step counter advances while it goes; the snapshot
    is drawn; the monitor's reader is an observer: the analytics that attaches later still gets every step."""
    from selenium.webdriver.common.by import By

    run = run_name("monpage")
    mon = Monitor(cluster, run)
    browser = _chromium()
    sim = start_sim(cluster, 4, {"run": run, "steps": 150, "sleep": 0.1})
    try:
        browser.get(mon.url)
        ana = start_ana(cluster, {"run": run})
        seen: list[int] = []
        end = time.monotonic() + 120
        while len(set(seen)) < 3 and time.monotonic() < end:
            text = browser.find_element(By.ID, "step").text
            if text.isdigit():
                seen.append(int(text))
            time.sleep(0.5)
        assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # advancing, never backwards
        shown: list[int] = []  # the snapshot is the latest one: its step advances too
        end = time.monotonic() + 60
        while len(set(shown)) < 2 and time.monotonic() < end:
            match = re.fullmatch(r"\(step (\d+)\)", browser.find_element(By.ID, "snapstep").text)
            if match and int(match.group(1)) >= 30:  # and the plots have some history for the screenshot
                shown.append(int(match.group(1)))
            time.sleep(0.5)
        assert len(set(shown)) >= 2, shown
        assert browser.execute_script("return document.getElementById('snapshot').naturalWidth") > 100
        kinds = {c["kind"] for c in head_stats(run)["consumers"].values()}
        assert kinds == {"monitor", "analytics"}, kinds
        shot = Path(os.environ.get("INSITU_SCREENSHOT", tmp_path / "monitor.png"))
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        result = finish_sim(sim)
        out, _ = ana.communicate(timeout=120)
    finally:
        browser.quit()
        mon.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert lines[-1]["done"] == 150, lines[-1]  # the monitor, attached first, took no step from the analytics
    assert [x["step"] for x in lines if "step" in x] == list(range(150))


def test_a_module_whose_own_thread_dies_exits_so_that_it_is_restarted() -> None:
    code = ("import threading, time\nfrom insitu.monitor.child import fatal_in_thread\n"
            "threading.Thread(target=fatal_in_thread(lambda: 1 / 0), daemon=True).start()\n"
            "time.sleep(30)\n")  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 70 and time.monotonic() - started < 20, (proc.returncode, proc.stderr[-2000:])
    assert "ZeroDivisionError" in proc.stderr and "the module exits so that it is restarted" in proc.stderr
