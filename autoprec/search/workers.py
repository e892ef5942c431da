"""Local worker processes sharing one study through the store (`autoprec search --workers N`).

The launching process has opened the study (measured the fp32 reference and created it, or
resumed it); it registers one run with the requested trial count and starts N processes
(`python -m autoprec.search.workers`, one per device with --devices). Each reads its job as one line
of JSON on its standard input, never on its command line (every local user can read that with `ps`,
and the store's URL may hold a password): the search config, pinned to the study, its store, the
study's thread count and its own seed and device, and the run to join. They reserve trials from that run in the store
(autoprec/ledger.py), so together they run exactly the requested number, and a worker killed
mid-trial has its trial failed by the heartbeat and retried by a survivor. Workers on other
machines join the same study by running `autoprec search` with the same --storage and --study.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autoprec.search.loop import Search, SearchConfig, SearchResult


@dataclass
class WorkerJob:
    config: SearchConfig  # pinned: study, storage, threads, device and seed of this worker
    run_id: str

    def to_json(self) -> str:
        return json.dumps({"config": self.config.to_json(), "run_id": self.run_id})

    @classmethod
    def from_json(cls, text: str) -> "WorkerJob":
        data: dict[str, Any] = json.loads(text)
        return cls(SearchConfig.from_json(data["config"]), data["run_id"])


def worker_job(search: Search, run_id: str, index: int) -> WorkerJob:
    config = search.config
    device = config.devices[index % len(config.devices)] if config.devices else config.device
    pinned = dataclasses.replace(config, study=search.study_name, storage=search.storage_url, threads=search.threads,
                                 device=device, seed=config.seed + index, workers=1, devices=None,
                                 progress=False, retime_front=False)
    return WorkerJob(pinned, run_id)


def _start_worker(job: WorkerJob) -> subprocess.Popen:
    """A worker process with its job on its standard input (a pipe), not on its command line."""
    proc = subprocess.Popen([sys.executable, "-m", "autoprec.search.workers"], stdin=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdin is not None
    try:
        proc.stdin.write((job.to_json() + "\n").encode())
        proc.stdin.close()
    except BrokenPipeError:  # the worker died at start: its exit status says so
        pass
    return proc


def run_workers(search: Search) -> SearchResult:
    config = search.config
    workers = config.workers
    from autoprec.store.recovery import retry_interrupted

    retry_interrupted(search.study)
    run_id = search.ledger.new_run(search.study_name, config.trials)
    search.run_id = run_id
    # In their own session: a Ctrl-C in the terminal reaches the launcher alone, which passes one
    # SIGINT to each worker (two would break a worker's store writes half way).
    procs = [_start_worker(worker_job(search, run_id, i)) for i in range(workers)]
    from tqdm.auto import tqdm

    bar = tqdm(total=config.trials, desc=f"trials ({workers} workers)", unit="trial", disable=not config.progress)
    interrupted = False
    try:
        while any(p.poll() is None for p in procs):
            bar.n = search.trials_of_run()
            bar.refresh()
            time.sleep(1.0)
    except KeyboardInterrupt:
        interrupted = True
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the workers are stopping; let them
        try:
            search.ledger.close_run(run_id)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                p.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        bar.n = search.trials_of_run()
        bar.close()
    failed = [i for i, p in enumerate(procs) if p.returncode not in (0, -signal.SIGKILL, 130)]
    if not interrupted:
        search.finish()
    if failed and not interrupted:
        print(f"autoprec: workers {failed} exited with an error; their trials are in the store", file=sys.stderr)
    return search.result(interrupted)


def main(argv: Sequence[str] | None = None) -> int:
    """One worker: open the study its job names and run a share of the job's run."""
    from autoprec.logs import quiet_libraries
    from autoprec.errors import AutoprecError

    args = sys.argv[1:] if argv is None else list(argv)
    quiet_libraries()
    try:
        job = WorkerJob.from_json(args[0] if args else sys.stdin.readline())
        result = Search.open(job.config).run(None, job.config.timeout, run_id=job.run_id)
    except AutoprecError as exc:
        print(f"autoprec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    from autoprec.process import exit_process

    exit_process(main())
