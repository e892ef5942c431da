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

Stopping: SIGINT, SIGTERM and SIGHUP to the launcher each reach every worker as one SIGINT (the
workers run in their own sessions); each records its trial in progress as interrupted. A worker
whose launcher is gone (kill -9) stops after its current trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from autoprec.search.loop import Search, SearchConfig, SearchResult


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@dataclass
class WorkerJob:
    config: SearchConfig  # pinned: study, storage, threads, device and seed of this worker
    run_id: str
    launcher_pid: int | None = None  # the worker stops after its trial once this is no longer its parent

    def to_json(self) -> str:
        return json.dumps({"config": self.config.to_json(), "run_id": self.run_id, "launcher_pid": self.launcher_pid})

    @classmethod
    def from_json(cls, text: str) -> "WorkerJob":
        data: dict[str, Any] = json.loads(text)
        return cls(SearchConfig.from_json(data["config"]), data["run_id"], data.get("launcher_pid"))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP stop this process as Ctrl-C does (what `timeout`, systemd, batch schedulers
    and a closed terminal send): the trial in progress is recorded as interrupted."""
    previous = {s: signal.signal(s, _interrupt) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def worker_job(search: Search, run_id: str, index: int) -> WorkerJob:
    config = search.config
    device = config.devices[index % len(config.devices)] if config.devices else config.device
    pinned = dataclasses.replace(config, study=search.study_name, storage=search.storage_url, threads=search.threads,
                                 device=device, seed=config.seed + index, workers=1, devices=None,
                                 progress=False, retime_front=False)
    return WorkerJob(pinned, run_id, os.getpid())


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
        with stop_signals_interrupt():
            while any(p.poll() is None for p in procs):
                bar.n = search.trials_of_run()
                bar.refresh()
                time.sleep(1.0)
    except KeyboardInterrupt:
        interrupted = True
        # the workers are stopping; let them
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, *STOP_SIGNALS)}
        try:
            search.ledger.close_run(run_id)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                p.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
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
        with stop_signals_interrupt():
            job = WorkerJob.from_json(args[0] if args else sys.stdin.readline())
            result = Search.open(job.config).run(None, job.config.timeout, run_id=job.run_id,
                                                 stop=lambda: _launcher_gone(job.launcher_pid))
    except AutoprecError as exc:
        print(f"autoprec: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from autoprec.store.storage import store_fault

        fault = store_fault(exc)
        if fault is None:
            raise
        print(f"autoprec: error: {fault}", file=sys.stderr)
        return fault.exit_code
    return 130 if result.interrupted else 0


def _launcher_gone(launcher_pid: int | None) -> bool:
    """True once the launcher died: this worker was handed to another parent."""
    if launcher_pid is None or os.getppid() == launcher_pid:
        return False
    print(f"autoprec: worker {os.getpid()}: its launcher (pid {launcher_pid}) is gone; stopping", file=sys.stderr)
    return True


if __name__ == "__main__":
    from autoprec.process import exit_process

    exit_process(main())
