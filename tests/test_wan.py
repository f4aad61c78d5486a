"""The WAN harness (scripts/wan/harness.py): its links match their settings and it leaves nothing behind.

Needs root and network namespaces. Where ``ip netns add`` is not permitted the tests fail with a message
saying so: the harness is part of the project and must run in CI.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = [sys.executable, str(ROOT / "scripts" / "wan" / "harness.py")]
LINK = ["--rtt-ms", "20", "--rate-mbit", "20"]
UP_LINE = re.compile(r"topology (\S+) up")


@pytest.fixture(scope="module", autouse=True)
def namespaces_permitted():
    name = f"p2pw-test-{os.getpid()}"
    try:
        done = subprocess.run(["ip", "netns", "add", name], check=False, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        pytest.fail("the WAN harness tests need iproute2 (`ip`), which is not installed")
    if done.returncode != 0:
        pytest.fail(f"the WAN harness tests need root and network namespaces; `ip netns add` said: "
                    f"{done.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def leftovers(token: str) -> tuple[list[str], list[int]]:
    """Namespaces and processes that still belong to the run ``token``."""
    listed = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout.split()
    spaces = [n for n in listed if n.startswith(f"p2pw-{token}-")]
    procs = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("P2PW_TOKEN") == token:
                procs.append(p.pid)
        except psutil.Error:
            pass
    return spaces, procs


def start(*args: str) -> tuple[subprocess.Popen, str]:
    """Start the harness and return it with its token, once its topology is up."""
    proc = subprocess.Popen([*HARNESS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = UP_LINE.search(line)
    if not m:
        proc.kill()
        pytest.fail(f"the harness did not bring its topology up: {line}{proc.stderr.read()}")
    return proc, m.group(1)


def test_selfcheck_matches_settings_and_cleans_up():
    proc, token = start("selfcheck", *LINK, "--seconds", "2", "--warmup", "0.5", "--pings", "20", "--json")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"selfcheck failed:\n{out}{err}"
    figures = json.loads(out)
    assert abs(figures["rtt_ms_median"] - 20) <= 2, figures
    assert abs(figures["wire_mbit"] - 20) <= 2, figures
    assert leftovers(token) == ([], [])


def test_sigint_mid_run_removes_everything():
    proc, token = start("selfcheck", *LINK, "--seconds", "30", "--pings", "20")
    time.sleep(1.0)  # the probes are running
    assert leftovers(token)[0], "the run's namespaces should exist while it runs"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert leftovers(token) == ([], [])


def test_cleanup_removes_what_a_killed_run_left():
    proc, token = start("selfcheck", *LINK, "--seconds", "30", "--pings", "20")
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    assert leftovers(token)[0], "a SIGKILLed harness cannot remove its namespaces itself"
    done = subprocess.run([*HARNESS, "cleanup"], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert leftovers(token) == ([], [])
