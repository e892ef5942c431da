"""Store load: N worker processes sharing one autoprec run, on PostgreSQL and on SQLite.

Each worker runs autoprec's own worker loop, `Search.run(None, run_id=RUN)` (reserve a trial in
the ledger -> `study.optimize(objective, n_trials=1)` -> repeat; when the run is used up but a
sibling's trial of the run is still RUNNING, wait 1 s and `fail_stale_trials`), over the store
opened by `autoprec.store.storage.open_storage(url)` (heartbeat on, the RetryAndRelease stale callback,
SQLite in WAL mode with a 60 s busy timeout), with the same sampler as `--strategy tpe` (multivariate
TPE, constant liar). Only the model work is replaced: the stand-in objective suggests a policy-sized
set of per-layer formats (as `Search.objective` does), writes the same user attrs (run_id, worker,
policy, counts, measurement, score_drop; failure_reason on a failed candidate), sleeps a random
5-20 ms instead of measuring, sets the score_drop constraint and returns three values. A fraction
of candidates (--fail-rate) raise CandidateFailed, like a candidate that cannot run.

The Search object is assembled without its __init__ (which would load a model.py, measure the fp32
reference and profile); everything `run()` touches is set as `__init__` sets it.

Counted per backend, after all workers exit, from the store itself:
- complete trials; failed trials split into candidate failures (by design) and other failures
  (store errors, stale heartbeats); lost trials = quota - (complete + candidate failures), i.e.
  trials the run asked for that produced no outcome; RUNNING / WAITING trials left behind;
  whether trial numbers are unique and contiguous; the run's `reserved` vs `quota` in the ledger;
- trials per second = outcomes / wall time from the start signal to the last worker's exit, and
  over the first and last 200 completions (does the store slow down as the study grows?);
- store overhead per trial = median(trial duration - stand-in sleep);
- 'database is locked' errors: every one the driver raised (SQLAlchemy `handle_error` event on the
  store's engine, including those the ledger retried), and the ones that surfaced (crashed a
  worker, or logged by Optuna as a failed trial / heartbeat error);
- worker crashes (an exception out of Search.run ends a real worker process too).

After --max-seconds the run is closed (`Ledger.close_run`, autoprec's own stop); a worker still in
Search.run HANG_S later (waiting on a sibling's RUNNING trial that never goes stale) is terminated
and reported.

With SQLite it also runs `autoprec search tests/specs/tiny_mlp.py --workers 8 --storage sqlite:///...`
and prints the refusal.

    .venv/bin/python benchmarks/store_load.py [--workers 8] [--trials-per-worker 200] [--sleep-ms 5-20]
        [--backends postgres,sqlite] [--postgres-url postgresql://postgres@127.0.0.1:5432/test]
        [--layers 24] [--fail-rate 0.05] [--strategy tpe] [--max-seconds 900] [--sqlite-busy-timeout S]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from autoprec.store import worker_tables as ledger_module
from autoprec.store.worker_tables import worker_name  # noqa: E402
from autoprec.search.study_setup import DIRECTIONS, OBJECTIVES  # noqa: E402
from autoprec.store.schema import DEFAULT_PARAM, LAYER_PARAM, Origin, policy_from_params  # noqa: E402
from autoprec.search.loop import CandidateFailed, Search, SearchConfig  # noqa: E402
from autoprec.store import storage as store_module
from autoprec.store.recovery import GRACE_S, HEARTBEAT_S  # noqa: E402
from autoprec.store.storage import open_storage  # noqa: E402

DEFAULT_PG = os.environ.get("AUTOPREC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
FORMATS = ["fp32", "fp16", "bf16", "int8"]
LOCKED = "database is locked"
MAX_DROP = 0.01
WINDOW = 200  # completions per window for the first/last throughput
HANG_S = 120  # a worker still in Search.run this long after the run was closed is stuck


# ---------------------------------------------------------------- worker side

def _chain_text(exc: BaseException | None) -> str:
    """The text of an exception and of everything it was raised from (StorageInternalError hides the cause)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        parts.append(f"{type(exc).__name__}: {text[0][:100] if text else ''}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)


class _Counter(logging.Handler):
    """Counts Optuna's warnings (failed trials, heartbeat trouble) that are not the stand-in's own failures."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.locked = 0
        self.other: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += " " + _chain_text(record.exc_info[1])
        if "CandidateFailed" in text or text.endswith("failed with value None."):  # the stand-in's own failures
            return
        if LOCKED in text:
            self.locked += 1
        elif len(self.other) < 5:
            self.other.append(text.splitlines()[0][:300])


def _standin_objective(self: Search, trial: optuna.Trial) -> tuple[float, float, float]:
    """Search.objective with the measurement replaced by a short sleep (same store writes, same order)."""
    trial.set_user_attr("run_id", self.run_id)
    trial.set_user_attr("worker", worker_name())
    self._last_origin = Origin.parse(trial.user_attrs.get("origin"))
    params = {DEFAULT_PARAM: trial.suggest_categorical(DEFAULT_PARAM, ["fp32", "bf16", "fp16"])}
    for name in self._standin_layers:
        params[LAYER_PARAM + name] = trial.suggest_categorical(LAYER_PARAM + name, FORMATS)
    policy = policy_from_params(params)
    trial.set_user_attr("policy", policy.to_json())
    trial.set_user_attr("counts", policy.counts() | {"default": policy.default})
    rng: random.Random = self._standin_rng
    sleep_s = rng.uniform(*self._standin_sleep)
    time.sleep(sleep_s)
    counts = policy.counts()
    n = max(1, len(params) - 1)
    score = 1.0 - 0.02 * counts["int8"] / n - 0.004 * (counts["fp16"] + counts["bf16"]) / n + rng.gauss(0, 1e-4)
    latency = 10.0 * (1 - 0.5 * counts["int8"] / n - 0.3 * (counts["fp16"] + counts["bf16"]) / n)
    memory = int(4e6 * (1 - 0.75 * counts["int8"] / n - 0.5 * (counts["fp16"] + counts["bf16"]) / n))
    failed = rng.random() < self._standin_fail_rate
    measurement = {  # the keys of autoprec.measure.evaluator.Measurement.to_json()
        "feasible": not failed, "reason": "stand-in: candidate could not run" if failed else None,
        "score": None if failed else score, "latency_ms": None if failed else latency,
        "latency_ratio": None if failed else latency / 10.0, "latency_spread": None if failed else 1.02,
        "latency_runs": 0 if failed else 1, "candidate_ms": None if failed else latency,
        "memory_bytes": None if failed else memory, "peak_bytes": None if failed else memory + 65536,
        "methods": {"score_fidelity": "stand-in", "latency": "stand-in", "memory": "stand-in"},
        "standin_sleep_ms": 1000 * sleep_s,
    }
    trial.set_user_attr("measurement", measurement)
    if failed:
        trial.set_user_attr("failure_reason", measurement["reason"])
        raise CandidateFailed(measurement["reason"])
    drop = 1.0 - score
    trial.set_user_attr("score_drop", drop)
    trial.set_constraint("score_drop", drop - MAX_DROP)
    return score, latency, float(memory)


def _worker(url: str, study_name: str, run_id: str, index: int, opts: dict, go: mp.Event, out: mp.Queue) -> None:
    result: dict = {"index": index, "pid": os.getpid(), "status": "ok", "error": None, "crash_locked": False}
    counter = _Counter()
    hb_errors: list[str] = []
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.logging.disable_default_handler()
        optuna.logging.get_logger("optuna").addHandler(counter)
        threading.excepthook = lambda a: hb_errors.append(_chain_text(a.exc_value))
        constraint_kept = [0]
        show = warnings.showwarning

        def count_warning(message, category, *rest, **kw):  # a retried trial inherits the failed one's constraint
            if "constraint value is ignored" in str(message):
                constraint_kept[0] += 1
            else:
                show(message, category, *rest, **kw)

        warnings.showwarning = count_warning

        driver_errors = {"locked": 0, "other": 0, "other_text": []}
        ledger_locked = [0]
        original_with_retry = ledger_module.with_retry

        def counting_with_retry(action, what, attempts=6):  # count, then behave exactly as before
            def counted():
                try:
                    return action()
                except sa.exc.OperationalError as exc:
                    if LOCKED in str(exc):
                        ledger_locked[0] += 1
                    raise
            return original_with_retry(counted, what, attempts)

        ledger_module.with_retry = counting_with_retry
        if opts.get("sqlite_timeout") is not None and url.startswith("sqlite"):  # what-if: not autoprec's 60 s
            store_module._engine_kwargs = lambda _url: {"connect_args": {"timeout": opts["sqlite_timeout"]}}

        storage = open_storage(url)

        @sa.event.listens_for(storage.engine, "handle_error")
        def _on_error(ctx) -> None:
            text = str(ctx.original_exception)
            if LOCKED in text:
                driver_errors["locked"] += 1
            else:
                driver_errors["other"] += 1
                if len(driver_errors["other_text"]) < 3:
                    driver_errors["other_text"].append(text.splitlines()[0][:200])

        config = SearchConfig(model="(stand-in)", storage=url, study=study_name, seed=index, strategy=opts["strategy"],
                              progress=False, retime_front=False)
        search = object.__new__(Search)  # what Search.__init__ sets that run() uses; no model, no reference
        search.config = config
        search.phase_seconds = {}
        search._last_origin = Origin()
        search.study_name = study_name
        search.storage_url = url
        search.storage = storage
        search.ledger = storage.ledger
        search.evaluator = None
        search.max_drop = MAX_DROP
        search.reference_score = 1.0
        search.study = optuna.load_study(study_name=study_name, storage=storage, sampler=search._sampler())
        search._standin_layers = [f"encoder.layer.{i // 6}.{('q', 'k', 'v', 'o', 'up', 'down')[i % 6]}"
                                  for i in range(opts["layers"])]
        search._standin_rng = random.Random(1000 + index)
        search._standin_sleep = (opts["sleep_lo_ms"] / 1000, opts["sleep_hi_ms"] / 1000)
        search._standin_fail_rate = opts["fail_rate"]
        search.objective = types.MethodType(_standin_objective, search)

        out.put(("ready", index))
        go.wait()
        result["start"] = time.time()
        try:
            search.run(None, None, run_id=run_id)
        except BaseException as exc:  # a real worker process would die here (autoprec: error: ..., exit 2)
            text = _chain_text(exc)
            result.update(status="crashed", error=text.splitlines()[0][:300], crash_locked=LOCKED in text)
        result["end"] = time.time()
        result.update(driver_locked=driver_errors["locked"], driver_other=driver_errors["other"],
                      driver_other_text=driver_errors["other_text"], ledger_locked=ledger_locked[0],
                      logged_locked=counter.locked, logged_other=counter.other,
                      heartbeat_errors=len(hb_errors), heartbeat_locked=sum(LOCKED in t for t in hb_errors),
                      heartbeat_first=hb_errors[:1], constraint_kept=constraint_kept[0])
    except BaseException as exc:
        result.update(status="setup failed", error=_chain_text(exc).splitlines()[0][:300] + "\n"
                      + traceback.format_exc()[-800:])
        out.put(("ready", index))
    out.put(("done", result))


# ---------------------------------------------------------------- launcher side

def _versions(pg_url: str | None) -> dict[str, str]:
    import sqlite3

    rows = {"python": platform.python_version(), "optuna": optuna.__version__, "sqlalchemy": sa.__version__,
            "sqlite library": sqlite3.sqlite_version}
    try:
        import psycopg

        rows["psycopg"] = psycopg.__version__
    except ImportError:
        pass
    if pg_url:
        try:
            engine = sa.create_engine(pg_url)
            with engine.connect() as conn:
                rows["postgresql server"] = conn.exec_driver_sql("SHOW server_version").scalar()
            engine.dispose()
        except Exception as exc:
            rows["postgresql server"] = f"unreachable ({str(exc).splitlines()[0]})"
    return rows


def run_backend(name: str, url: str, opts: dict, workers: int, quota: int, max_seconds: float) -> dict:
    storage = open_storage(url, heartbeat=False)
    study_name = f"store-load-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=study_name, storage=storage, directions=list(DIRECTIONS))
    study.set_metric_names(list(OBJECTIVES))
    run_id = storage.ledger.new_run(study_name, quota)

    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, study_name, run_id, i, opts, go, out), daemon=True)
             for i in range(workers)]
    for p in procs:
        p.start()
    ready = 0
    while ready < workers:
        kind, _ = out.get(timeout=600)
        ready += kind == "ready"
    t0 = time.time()
    go.set()
    results, closed_at, hung = [], None, []
    while len(results) < workers:
        try:
            kind, payload = out.get(timeout=2)
        except Exception:  # queue.Empty
            now = time.time() - t0
            if closed_at is None and now > max_seconds:
                closed_at = now
                storage.ledger.close_run(run_id)  # autoprec's own stop: workers finish their current trial
                print(f"  [{name}] over {max_seconds:.0f} s: closed the run", file=sys.stderr)
            if closed_at is not None and now > closed_at + HANG_S:  # still in Search.run: stuck waiting
                returned = {r["index"] for r in results}
                hung = [i for i, p in enumerate(procs) if p.is_alive() and i not in returned]
                print(f"  [{name}] workers {hung} still running {HANG_S} s after the run was closed: "
                      "terminating them", file=sys.stderr)
                for i in hung:
                    procs[i].terminate()
                break
            if not any(p.is_alive() for p in procs) and out.empty():
                break
            continue
        if kind == "done":
            results.append(payload)
    for p in procs:
        p.join(timeout=30)
    wall = (max((r.get("end", t0) for r in results), default=time.time()) if not hung else time.time()) - t0
    crashed_procs = [p.exitcode for p in procs if p.exitcode not in (0, None)]

    # -------- what the store says
    check = optuna.load_study(study_name=study_name, storage=open_storage(url, heartbeat=False))
    trials = check.get_trials(deepcopy=False)
    state = optuna.trial.TrialState
    complete = [t for t in trials if t.state == state.COMPLETE]
    failed = [t for t in trials if t.state == state.FAIL]
    candidate_failed = [t for t in failed if "failure_reason" in t.user_attrs]
    other_failed = [t for t in failed if "failure_reason" not in t.user_attrs]
    running = [t for t in trials if t.state == state.RUNNING]
    waiting = [t for t in trials if t.state == state.WAITING]
    numbers = sorted(t.number for t in trials)
    with storage.engine.connect() as conn:
        row = conn.execute(sa.select(ledger_module.runs.c.reserved, ledger_module.runs.c.quota)
                           .where(ledger_module.runs.c.run_id == run_id)).one()
    outcomes = len(complete) + len(candidate_failed)
    target = row.quota  # == quota unless the run was closed at --max-seconds
    done = sorted((t for t in trials if t.datetime_complete is not None), key=lambda t: t.datetime_complete)

    def window_rate(ts: list) -> float | None:
        if len(ts) < 2:
            return None
        span = (ts[-1].datetime_complete - ts[0].datetime_complete).total_seconds()
        return (len(ts) - 1) / span if span > 0 else None

    overhead = [((t.datetime_complete - t.datetime_start).total_seconds() * 1000
                 - t.user_attrs.get("measurement", {}).get("standin_sleep_ms", 0.0))
                for t in complete if t.datetime_start and t.datetime_complete]
    per_worker = {}
    for t in trials:
        per_worker[t.user_attrs.get("worker", "?")] = per_worker.get(t.user_attrs.get("worker", "?"), 0) + 1
    return {
        "backend": name, "url": url, "study": study_name, "workers": workers, "quota": quota, "target": target,
        "closed_at": closed_at, "wall": wall, "trials": len(trials), "complete": len(complete),
        "candidate_failed": len(candidate_failed), "other_failed": len(other_failed),
        "other_failed_reasons": sorted({str(t.system_attrs.get("fail_reason", ""))[:120] for t in other_failed})[:3],
        "retried": sum(1 for t in trials if "failed_trial" in t.system_attrs),
        "lost": target - outcomes, "outcomes": outcomes, "running_left": len(running), "waiting_left": len(waiting),
        "numbers_ok": numbers == list(range(len(trials))), "reserved": row.reserved, "ledger_quota": row.quota,
        "rate": outcomes / wall if wall > 0 else 0.0,
        "rate_first": window_rate(done[:WINDOW]), "rate_last": window_rate(done[-WINDOW:]),
        "overhead_ms": statistics.median(overhead) if overhead else None,
        "overhead_p90_ms": statistics.quantiles(overhead, n=10)[-1] if len(overhead) >= 10 else None,
        "per_worker": sorted(per_worker.values()),
        "crashes": [r for r in results if r["status"] != "ok"], "exitcodes": crashed_procs,
        "missing_results": workers - len(results), "hung": hung,
        "driver_locked": sum(r.get("driver_locked", 0) for r in results),
        "ledger_locked": sum(r.get("ledger_locked", 0) for r in results),
        "surfaced_locked": sum(int(r.get("crash_locked", False)) + r.get("logged_locked", 0)
                               + r.get("heartbeat_locked", 0) for r in results),
        "driver_other": sum(r.get("driver_other", 0) for r in results),
        "driver_other_text": sorted({x for r in results for x in r.get("driver_other_text", [])})[:3],
        "logged_other": sorted({x for r in results for x in r.get("logged_other", [])})[:3],
        "constraint_kept": sum(r.get("constraint_kept", 0) for r in results),
        "heartbeat_errors": sum(r.get("heartbeat_errors", 0) for r in results),
        "heartbeat_first": [x for r in results for x in r.get("heartbeat_first", [])][:1],
    }


def sqlite_refusal(workers: int, directory: Path) -> dict:
    db = directory / "refused.db"
    url = f"sqlite:///{db}"
    cmd = [sys.executable, "-m", "autoprec", "search", "tests/specs/tiny_mlp.py", "--workers", str(workers),
           "--trials", "16", "--storage", url, "--no-progress"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    left = "no file"
    if db.exists():
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            studies = conn.exec_driver_sql("SELECT study_name FROM studies").scalars().all()
            n_trials = conn.exec_driver_sql("SELECT count(*) FROM trials").scalar()
            n_runs = conn.exec_driver_sql("SELECT count(*) FROM autoprec_runs").scalar()
        engine.dispose()
        left = f"studies {studies}, {n_trials} trials (enqueued uniform policies), {n_runs} runs"
    shown = "autoprec search tests/specs/tiny_mlp.py --workers " + f"{workers} --trials 16 --storage sqlite:///REFUSED.db"
    return {"cmd": shown, "rc": proc.returncode, "stderr": proc.stderr.strip(), "stdout": proc.stdout.strip(),
            "seconds": seconds, "left": left}


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> None:
    from _common import cpu_model  # here, not at the top: it imports torch, which workers do not need

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials-per-worker", type=int, default=200)
    parser.add_argument("--sleep-ms", default="5-20", help="stand-in evaluation time: LO-HI (uniform) or one value")
    parser.add_argument("--backends", default="postgres,sqlite")
    parser.add_argument("--postgres-url", default=DEFAULT_PG)
    parser.add_argument("--sqlite-path", default=None, help="SQLite file (default: a fresh temporary file)")
    parser.add_argument("--layers", type=int, default=24, help="per-layer params per trial (policy size)")
    parser.add_argument("--fail-rate", type=float, default=0.05, help="fraction of candidates that fail by design")
    parser.add_argument("--strategy", default="tpe", choices=["tpe", "random", "nsga2"],
                        help="sampler, as Search._sampler() builds it for that --strategy")
    parser.add_argument("--max-seconds", type=float, default=900,
                        help="per backend: after this, close the run (workers stop after their trial)")
    parser.add_argument("--sqlite-busy-timeout", type=float, default=None, dest="sqlite_timeout",
                        help="what-if: the workers' SQLite busy timeout in s instead of autoprec's 60 "
                             "(shows what the timeout hides, and that the 'database is locked' counters work)")
    parser.add_argument("--no-refusal", dest="refusal", action="store_false",
                        help="skip the `autoprec search --workers N` on SQLite refusal check")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lo, _, hi = args.sleep_ms.partition("-")
    opts = {"sleep_lo_ms": float(lo), "sleep_hi_ms": float(hi or lo), "layers": args.layers,
            "fail_rate": args.fail_rate, "strategy": args.strategy, "sqlite_timeout": args.sqlite_timeout}
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    quota = args.workers * args.trials_per_worker
    tmp = Path(tempfile.mkdtemp(prefix="store_load_"))

    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    header = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
              "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores)",
              "load average at start (1/5/15 min)": load}
    header.update(_versions(args.postgres_url if "postgres" in backends else None))
    header["settings"] = (f"{args.workers} workers x {args.trials_per_worker} trials (quota {quota}) in one run; "
                          f"stand-in sleep {args.sleep_ms} ms; {args.layers} layer params + default; "
                          f"fail rate {args.fail_rate}; sampler as --strategy {args.strategy}; "
                          f"heartbeat {HEARTBEAT_S} s, grace {GRACE_S} s; SQLite busy timeout "
                          + ("60 s (autoprec's)" if args.sqlite_timeout is None
                             else f"{args.sqlite_timeout} s (what-if, not autoprec's 60 s)"))

    rows = []
    for name in backends:
        if name == "postgres":
            url = args.postgres_url
        elif name == "sqlite":
            url = f"sqlite:///{args.sqlite_path or tmp / 'store.db'}"
        else:
            parser.error(f"--backends: unknown {name!r} (postgres, sqlite)")
        print(f"[{name}] {args.workers} workers x {args.trials_per_worker} trials ...", file=sys.stderr, flush=True)
        r = run_backend(name, url, opts, args.workers, quota, args.max_seconds)
        print(f"[{name}] done in {r['wall']:.1f} s", file=sys.stderr, flush=True)
        rows.append(r)

    refusal = sqlite_refusal(args.workers, tmp) if "sqlite" in backends and args.refusal else None

    print("\n".join(f"- {k}: {v}" for k, v in header.items()))
    print()
    cols = ["backend", "trials (quota)", "wall s", "trials/s", "trials/s first/last 200", "complete",
            "failed: candidate / other", "lost", "RUNNING / WAITING left", "numbers unique", "ledger reserved",
            "worker crashes", "'database is locked' raised / surfaced", "store ms/trial median (p90)"]
    print("| " + " | ".join(cols) + " |")
    print("| " + " | ".join("---" for _ in cols) + " |")
    for r in rows:
        trials = f"{r['outcomes']} ({r['quota']}" + (f", closed at {r['target']}" if r["closed_at"] else "") + ")"
        cells = [r["backend"], trials, _fmt(r["wall"]), _fmt(r["rate"]),
                 f"{_fmt(r['rate_first'])} / {_fmt(r['rate_last'])}", r["complete"],
                 f"{r['candidate_failed']} / {r['other_failed']}", r["lost"],
                 f"{r['running_left']} / {r['waiting_left']}", "yes" if r["numbers_ok"] else "NO",
                 f"{r['reserved']} / {r['ledger_quota']}", len(r["crashes"]) + r["missing_results"],
                 f"{r['driver_locked']} / {r['surfaced_locked']}",
                 f"{_fmt(r['overhead_ms'])} ({_fmt(r['overhead_p90_ms'])})"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print()
    for r in rows:
        notes = [f"trials per worker {r['per_worker']}", f"stale-heartbeat retries {r['retried']}",
                 f"ledger retries on 'database is locked' {r['ledger_locked']}"]
        if r["driver_other"]:
            notes.append(f"other driver errors {r['driver_other']}: {r['driver_other_text']}")
        if r["other_failed"]:
            notes.append(f"other failures: {r['other_failed_reasons']}")
        if r["logged_other"]:
            notes.append(f"Optuna warnings: {r['logged_other']}")
        if r["constraint_kept"]:
            notes.append(f"retried trials whose set_constraint was ignored (kept the failed attempt's): "
                         f"{r['constraint_kept']}")
        if r["heartbeat_errors"]:
            notes.append(f"heartbeat thread errors {r['heartbeat_errors']}: {r['heartbeat_first']}")
        for c in r["crashes"]:
            notes.append(f"worker {c['index']} {c['status']}: {c['error']}")
        if r["hung"]:
            notes.append(f"workers {r['hung']} never left Search.run (terminated {HANG_S} s after the run was closed)")
        if r["closed_at"]:
            notes.append(f"run closed after {r['closed_at']:.0f} s (--max-seconds)")
        print(f"- {r['backend']}: " + "; ".join(notes))
        verdict_ok = (r["lost"] == 0 and r["running_left"] == 0 and r["numbers_ok"] and not r["crashes"]
                      and not r["missing_results"] and r["surfaced_locked"] == 0)
        print(f"  verdict: {'PASS' if verdict_ok else 'FAIL'} (target: zero lost"
              + (", zero 'database is locked' failures" if r["backend"] == "sqlite" else "") + ")")
    if refusal is not None:
        print(f"\n`{refusal['cmd']}` -> exit {refusal['rc']} after {refusal['seconds']:.1f} s, stderr:")
        print("    " + "\n    ".join(refusal["stderr"].splitlines() or ["(empty)"]))
        print(f"  stdout before the refusal: {refusal['stdout'].splitlines()[:1]}")
        print(f"  left in the SQLite file: {refusal['left']}")
    shutil.rmtree(tmp, ignore_errors=True)  # the temporary SQLite files (not --sqlite-path)


if __name__ == "__main__":
    main()
