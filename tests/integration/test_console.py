"""The operator console as an operator sees it: the stack's own Prometheus serves
/consoles/medclear*.html (monitoring/consoles/), headless Chromium renders each page after
a few minutes' worth of traffic (approvals, declines, a lost card tried, a PIN locked),
and every panel has data: each graph drew its lines, each figure and table has a value.
Screenshots are kept in test-artifacts/console/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from medclear.infra.settings import Settings
from medclear.sim import city, load
from tests.integration.running import running_stack

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "console"
PAGES = (
    "medclear",
    "medclear-swipes",
    "medclear-cards",
    "medclear-sms",
    "medclear-sink",
    "medclear-settlement",
    "medclear-stack",
)
PERSONS, SEED = 120, 2026
INSTITUTION, TERMINAL = "310101H00001", "T2"
SCRAPES_S = 12.0  # two scrapes (every 5 s) after the traffic, so every rate has two points
CHROMIUM = shutil.which("chromium")

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            CHROMIUM or "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={user_data}",
            "--window-size=1400,1500",
            "--virtual-time-budget=10000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )


def panels(dom: str) -> dict[str, str]:
    """Each `data-panel` element's markup, up to the next panel."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'data-panel="([^"]+)"', dom)]
    ends = [s for s, _ in starts[1:]] + [len(dom)]
    return {name: dom[start:end] for (start, name), end in zip(starts, ends, strict=True)}


def problems_of(name: str, markup: str) -> list[str]:
    if 'class="mc-graph"' in markup:
        if "prom_graph_error" in markup or "<svg" not in markup or "<path" not in markup:
            return [f"{name}: the graph drew nothing"]
        return []
    if re.search(r'class="mc-value">\s*-?\s*<', markup):
        return [f"{name}: no value"]
    if re.search(r"<td colspan=\"\d\">\s*-\s*</td>", markup):
        return [f"{name}: an empty table"]
    return []


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medclear", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def make_traffic(settings: Settings) -> None:
    """Approvals and declines, a lost card tried at a counter, a card locked by PINs."""
    load.seed_city(PERSONS, SEED, 16, settings)
    env = {**os.environ, "MEDCLEAR_STATE_DIR": str(settings.state_dir)}
    blue = [r for r in city.residents(PERSONS, SEED) if r.opening_balance_fen > 0]
    lost, locked = blue[0], blue[1]
    assert run_cli(env, "card", "report-loss", "--card", lost.card_no).returncode == 0
    swipe = (
        "pos",
        "swipe",
        "--amount",
        "1.00",
        "--institution",
        INSTITUTION,
        "--terminal",
        TERMINAL,
    )
    refused = run_cli(env, *swipe, "--card", lost.card_no, "--pin", lost.pin)
    assert refused.returncode == 3 and "CARD_PRE_LOST" in refused.stdout, refused.stdout
    wrong = f"{(int(locked.pin) + 1) % 10**6:06d}"
    for _ in range(3):
        run_cli(env, *swipe, "--card", locked.card_no, "--pin", wrong)
    swiped = run_cli(
        env,
        "bench",
        "swipes",
        "--count",
        "400",
        "--concurrency",
        "4",
        "--persons",
        str(PERSONS),
        "--seed",
        str(SEED),
    )
    assert swiped.returncode == 0, swiped.stdout[-2000:] + swiped.stderr[-2000:]


def wait_scraped(prometheus: str, timeout_s: float = 30.0) -> None:
    """Until Prometheus has scraped the worker once."""
    query = urllib.parse.urlencode({"query": 'up{job="medclear-worker"} == 1'})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{prometheus}/api/v1/query?{query}", timeout=5) as answer:
            if json.load(answer)["data"]["result"]:
                return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus did not scrape the worker within {timeout_s} s")


@needs_chromium
def test_every_console_page_renders_with_data_in_every_panel(tmp_path: Path) -> None:
    settings = Settings(
        state_dir=tmp_path / "state", tls=False, startup_timeout_s=90, restart_on_exit=True
    )  # terminal security on: PINs are checked
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_stack(settings) as endpoints:
        wait_scraped(endpoints.prometheus)  # the counters' zeros first, then the traffic
        make_traffic(settings)
        time.sleep(SCRAPES_S)
        problems: list[str] = []
        for page in PAGES:
            url = f"{endpoints.prometheus}/consoles/{page}.html"
            with urllib.request.urlopen(url, timeout=10) as answer:  # served, no template error
                assert answer.status == 200
            dom = chromium("--dump-dom", url, user_data=tmp_path / f"ud-{page}").stdout
            found = panels(dom)
            assert len(found) >= 2, (page, dom[:3000])
            problems += [p for name, markup in found.items() for p in problems_of(name, markup)]
            if page == "medclear-swipes":  # the traffic's own declines, by their codes
                declines = found["declines-by-code"]
                assert "CARD_PRE_LOST" in declines and "PIN_TRIES_EXCEEDED" in declines
            shot = ARTIFACTS / f"{page}.png"
            chromium(f"--screenshot={shot}", url, user_data=tmp_path / f"us-{page}")
            assert shot.stat().st_size > 10_000
        assert problems == []


def test_the_panel_check_sees_an_empty_graph_and_a_missing_value() -> None:
    dom = (
        '<div data-panel="a"><div class="mc-graph"><div class="prom_graph_error">No'
        ' timeseries returned</div></div></div><div data-panel="b"><div class="mc-value">-'
        '</div></div><div data-panel="c"><div class="mc-graph"><svg><path d="M0"/></svg>'
        '</div></div><div data-panel="d"><div class="mc-value">7</div></div>'
    )
    found = panels(dom)
    assert [p for n, m in found.items() for p in problems_of(n, m)] == [
        "a: the graph drew nothing",
        "b: no value",
    ]
