"""The agent's reaper (agent/guest/procs.py) in a process of its own: a reaper thread
takes every child of its process, so it never runs inside the test runner."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Counts the reaper's waitpid calls while the process has no child for a while, then
# spawns one through the Spawner and checks the reaper collects its status.
SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    calls = []
    real_waitpid = os.waitpid
    def counting_waitpid(pid, options):
        calls.append(time.monotonic())
        return real_waitpid(pid, options)
    os.waitpid = counting_waitpid
    from agent.guest.procs import Reaper, Spawner
    spawner = Spawner(Reaper())
    time.sleep(2.5)
    idle_calls = len(calls)
    code, out, err = spawner.run(["/bin/sh", "-c", "echo hi; exit 3"], timeout=30)
    print(idle_calls, code, out.decode().strip())
    """
)


def test_the_reaper_sleeps_while_there_is_no_child_and_wakes_for_a_new_one() -> None:
    """With no child, the reaper looks once and then sleeps until the Spawner starts one:
    every look is a wake-up of an idle guest, which costs the host CPU under TCG (it
    looked every second before)."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    idle_calls, code, out = done.stdout.split()
    assert int(idle_calls) == 1, f"the reaper polled {idle_calls} times in 2.5 s with no child"
    assert (int(code), out) == (3, "hi")
