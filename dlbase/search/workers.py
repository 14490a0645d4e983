"""`dlbase sweep --workers N`: N worker processes on this machine, each taking trials from the sweep's study.

Each worker is `python -m dlbase sweep <the same arguments> --worker I`: it joins the study and takes slots until
none is left, then exits; this process waits, then ranks the trials and tests the winner once. CPU threads are
split between the workers (N workers with all cores each would fight over them). On a machine with several
GPUs the workers take one each, round robin; with one GPU they share it, each with its own CUDA context and
copy of the data: one small MLP leaves most of a GPU idle, so two or three trials at once use it better.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Callable

from dlbase.core.errors import DlbaseError, SweepStopped

THREADS_ENV = "DLBASE_THREADS"  # torch CPU threads for a worker (dlbase sweep --worker reads it)


def plan_gpus(n: int, device: str) -> tuple[list[dict], str]:
    """Per worker extra environment, and one line saying how the devices are shared and why."""
    import torch
    cores = os.cpu_count() or 1
    threads = max(1, cores // n)
    envs = [{THREADS_ENV: str(threads)} for _ in range(n)]
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") or device.startswith("cuda") else 0
    if device.startswith("cuda:"):
        gpus = 0  # the config names one GPU: every worker uses it
        how = f"{n} workers share {device} (the config names it), {threads} CPU thread(s) each"
    elif gpus > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        for i, env in enumerate(envs):
            env["CUDA_VISIBLE_DEVICES"] = ids[i % len(ids)]
        how = (f"{n} workers on {gpus} GPUs, one each round robin ({', '.join(e['CUDA_VISIBLE_DEVICES'] for e in envs)}), "
               f"{threads} CPU thread(s) each")
    elif gpus == 1:
        how = (f"{n} workers share the one GPU (a small MLP leaves most of it idle, so trials side by side use it "
               f"better), {threads} CPU thread(s) each")
    else:
        how = f"{n} workers on the CPU, {threads} of its {cores} cores each"
    return envs, how


def run_workers(argv: list[str], n: int, device: str, log: Callable[[str], None]) -> None:
    """Start n workers with argv (the sweep's own arguments) and wait for all of them. A signal here is passed
    on: each worker saves its trial and stops, and this raises the signal's exit status."""

    envs, how = plan_gpus(n, device)
    log(how)
    # each worker in its own process group: a Ctrl-C at the terminal reaches this process only, which passes it
    # on once (twice would be a second Ctrl-C: stop at once, without saving)
    procs = [subprocess.Popen([sys.executable, "-m", "dlbase", "sweep", *argv, "--worker", str(i)],
                              env={**os.environ, **env}, process_group=0) for i, env in enumerate(envs)]
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        code = 130 if got[0] == signal.SIGINT else 143  # as one process stopped by that signal
        raise SweepStopped("sweep stopped by a signal; every worker saved its trial; rerun the same command to go "
                           "on", code)
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad and len(bad) == len(codes):
        raise DlbaseError(f"every worker stopped with an error (exit {', '.join(str(c) for _, c in bad)}; their "
                          f"lines above say why)")
    for i, c in bad:  # the others took its trials over: the study can still be complete
        log(f"worker {i} stopped with exit status {c}; the other workers took over its trials")
