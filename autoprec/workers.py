"""`autoprec search --workers N`: N local worker processes sharing one study through the store.

The launching process measures the fp32 reference and creates the study, registers one run with
the requested trial count, and starts N `autoprec search --join RUN` processes (one per device
with --devices). They reserve trials from that run in the store (autoprec/ledger.py), so together
they run exactly the requested number, and a worker killed mid-trial has its trial failed by the
heartbeat and retried by a survivor. Workers on other machines join the same study by running
`autoprec search` with the same --storage and --study.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from autoprec.errors import AutoprecError
from autoprec.search import Search, SearchConfig, SearchResult


def worker_command(config: SearchConfig, study: str, url: str, run_id: str, device: str | None, index: int,
                   threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "autoprec", "search", config.model, "--storage", url, "--study", study,
           "--join", run_id, "--seed", str(config.seed + index), "--no-progress", "--no-retime",
           "--strategy", config.strategy, "--max-rounds", str(config.timing.max_rounds)]
    if config.space:
        cmd += ["--space", config.space]
    if device:
        cmd += ["--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    if config.timeout is not None:
        cmd += ["--timeout", str(config.timeout)]
    if not config.timing.keep_freed_memory:
        cmd += ["--malloc-defaults"]
    return cmd


def run_workers(search: Search, workers: int, devices: list[str] | None = None) -> SearchResult:
    config = search.config
    if workers < 1:
        raise AutoprecError(f"--workers {workers}: must be at least 1")
    if search.storage_url.startswith("sqlite") and workers > 1:
        raise AutoprecError(f"--workers {workers} with SQLite ({search.storage_url}): SQLite lets one process "
                            "write at a time, so several workers may fail with 'database is locked'; use "
                            "--storage postgresql://USER@HOST/DB for several workers")
    threads = search.threads  # the study's: every worker times as the reference was timed
    run_id = search.ledger.new_run(search.study_name, config.trials)
    search.run_id = run_id
    before = search.finished_trials()
    procs = [subprocess.Popen(worker_command(config, search.study_name, search.storage_url, run_id,
                                             devices[i % len(devices)] if devices else config.device, i, threads))
             for i in range(workers)]
    from tqdm.auto import tqdm

    bar = tqdm(total=config.trials, desc=f"trials ({workers} workers)", unit="trial", disable=not config.progress)
    interrupted = False
    try:
        while any(p.poll() is None for p in procs):
            bar.n = search.finished_trials() - before
            bar.refresh()
            time.sleep(1.0)
    except KeyboardInterrupt:
        interrupted = True
        search.ledger.close_run(run_id)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
    finally:
        bar.n = search.finished_trials() - before
        bar.close()
    failed = [i for i, p in enumerate(procs) if p.returncode not in (0, -signal.SIGKILL, 130)]
    if not interrupted:
        search.finish()
    if failed and not interrupted:
        print(f"autoprec: workers {failed} exited with an error; their trials are in the store", file=sys.stderr)
    total = search.finished_trials()
    return SearchResult(search.study_name, search.storage_url, total - before, total, interrupted,
                        dict(search.phase_seconds))
