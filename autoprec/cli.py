"""The `autoprec` command: each subcommand is a few lines over the library."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Sequence

from autoprec.errors import AutoprecError
from autoprec.logs import quiet_libraries


def cmd_layers(args: argparse.Namespace) -> None:
    from autoprec.search.space import load_space
    from autoprec.display import format_table
    from autoprec.model.model_file import load_spec
    from autoprec.measure.machine import resolve_device

    spec = load_spec(args.model)
    space = load_space(args.space)
    model = spec.new_model()
    device = resolve_device(args.device)
    choices = space.choices(model, device)
    if choices:
        space.check_device(model, device, refuse=False)  # the table shows what is left
    rows = [(layer.name, layer.cls, "x".join(map(str, layer.weight_shape)), f"{layer.params:,}",
             ",".join(choices.get(layer.name, ())) or "(none on this device)")
            for layer in space.layers(model)]
    print(format_table(["layer", "class", "weight", "params", "formats"], rows))
    total = sum(layer.params for layer in space.layers(model))
    print(f"\n{len(rows)} searchable layers, {total:,} parameters, space {space.name!r} ({space.source})")


def cmd_apply(args: argparse.Namespace) -> None:
    from autoprec.measure.remeasure import apply_and_compare

    print(apply_and_compare(args.policy, args.model, device=args.device, threads=_threads(args.threads),
                            timing=timing_settings(None, args.malloc_defaults), force=args.force))


def timing_settings(max_rounds: int | None, malloc_defaults: bool):
    from autoprec.measure.timing import TimingSettings

    keep = not malloc_defaults
    if max_rounds is None:
        return TimingSettings(keep_freed_memory=keep)
    if max_rounds < 1:
        raise AutoprecError(f"--max-rounds {max_rounds}: give at least 1")
    return TimingSettings(rounds=min(TimingSettings.rounds, max_rounds), max_rounds=max_rounds, keep_freed_memory=keep)


def _threads(threads: int | None) -> int | None:
    if threads is not None and threads < 1:
        raise AutoprecError(f"--threads {threads}: give at least 1, or leave it out for the default")
    return threads


def cmd_search(args: argparse.Namespace) -> None:
    from autoprec.results.frames import pareto_front, trials_frame
    from autoprec.search.loop import SearchConfig, run_search

    devices = tuple(args.devices.split(",")) if args.devices else None
    config = SearchConfig(model=args.model, trials=args.trials, timeout=args.timeout, storage=args.storage,
                          study=args.study, space=args.space, device=args.device, max_drop=args.max_drop,
                          seed=args.seed, threads=_threads(args.threads), progress=not args.no_progress,
                          workers=len(devices) if devices and args.workers == 1 else args.workers, devices=devices,
                          strategy=args.strategy, retime_front=not args.no_retime, runtime=args.runtime,
                          prune=not args.no_prune,
                          timing=timing_settings(args.max_rounds, args.malloc_defaults))
    result = run_search(config, on_open=_print_opened)
    if result.interrupted:
        print(f"stopped: {result.trials_run} trials run this time are kept in the store; "
              "run the same command to resume", file=sys.stderr)
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in result.phase_seconds.items())
    skipped = sum(result.skipped.values())
    skipped_text = (f"; {skipped} sampler proposals skipped, not measured ("
                    + ", ".join(f"{kind}: {n}" for kind, n in result.skipped.items()) + ")") if skipped else ""
    print(f"\n{result.trials_run} trials run, {result.trials_total} in the study ({phases}){skipped_text}. "
          "Feasible Pareto front:")
    front = pareto_front(trials_frame(result.study))
    print(_front_table(front))
    if result.verdict:
        print(f"\nstopped before --trials {args.trials}: {result.verdict}")
    if not front.empty:
        print(f"\nexport one with: {export_command(result.study_name, args.storage and result.storage)}")
    if result.interrupted:
        raise KeyboardInterrupt


def export_command(study: str, storage: str | None = None) -> str:
    """The `autoprec export` command for a study, quoted for a POSIX shell (a password in the URL masked)."""
    from autoprec.display import printable
    from autoprec.store.storage import shown_url

    command = f"autoprec export --study {shlex.quote(study)} --pick fastest -o policy.json"
    if storage:
        command += f" --storage {shlex.quote(shown_url(storage))}"
    return printable(command)


def _print_opened(search) -> None:
    print(search.summary())
    if search.pruning is not None:
        print(search.pruning.announcement)
    if search.layout_hint:
        print(search.layout_hint)
    warning = search.evaluator.reference_warning()
    if warning:
        print(warning, file=sys.stderr)


def _retimed_text(row) -> str:
    if row.retimed_ratio is not None and row.retimed_ratio == row.retimed_ratio:
        return f"{row.retimed_ratio:.3f}x"
    if getattr(row, "retime_too_noisy", False) in (True,):  # a bool column (NaN where a frame lacks it)
        return "too noisy"
    return "not re-timed" if getattr(row, "not_retimed", False) else "-"


def _front_table(front) -> str:
    from autoprec.display import format_bytes, format_table

    if front.empty:
        return "(no feasible trial yet)"
    from autoprec.precision import DTYPES

    # the common formats always, the others (fp8 and int4 on recent GPUs) where a member uses them
    formats = ["fp32", "fp16", "bf16", "int8"]
    formats += [f for f in DTYPES if f not in formats and f in front.columns and front[f].gt(0).any()]
    rows = [(int(r.trial), f"{r.score:.6f}", f"{r.score_drop:.2e}", f"{r.latency_ms:.2f}", f"{r.latency_ratio:.3f}x",
             _retimed_text(r), format_bytes(r.memory_bytes), f"{r.memory_ratio:.3f}x", r.default,
             *(getattr(r, f) for f in formats), r.origin)
            for r in front.itertuples()]
    header = ["trial", "score", "drop", "latency_ms", "vs fp32", "re-timed", "memory", "vs fp32", "default",
              *formats, "origin"]
    retimed = front.retimed_ratio.notna().any()
    note = ("\n(re-timed: the front timed again beside fp32 in one pass at the end of the last search, fastest and "
            "smallest first, within 15% of the search's time)") if retimed else ""
    if "retime_too_noisy" in front.columns and front.retime_too_noisy.eq(True).any():
        note += ("\n(too noisy: the re-time's interval was wider than the search's own measurement, so the "
                 "search's ratio stands; the machine was busy)")
    if "compile_s" in front.columns and front.compile_s.notna().any():  # the compiled runtime
        header[-1:-1] = ["compile s"]
        rows = [(*row[:-1], "-" if r.compile_s != r.compile_s or r.compile_s is None else f"{r.compile_s:.1f}", row[-1])
                for row, r in zip(rows, front.itertuples())]
        note += "\n(compile s: the trial's torch.compile time, from inductor's cache where it had the blocks)"
    if "step_ratio" in front.columns:  # training mode
        header[-1:-1] = ["train step", "lr", "loss scale"]
        rows = [(*row[:-1], "-" if r.step_ratio != r.step_ratio or r.step_ratio is None else f"{r.step_ratio:.2f}x",
                 f"{r.learning_rate:.1e}", f"{r.loss_scale:g}{'' if r.dynamic_loss_scale else ' static'}", row[-1])
                for row, r in zip(rows, front.itertuples())]
        note += "\n(train step: one training step under the policy / one fp32 step, timed interleaved)"
    return format_table(header, rows) + note


def _open_study(args: argparse.Namespace):
    from autoprec.store.storage import load_study, open_storage

    return load_study(open_storage(args.storage, readonly=True), args.study)


def cmd_front(args: argparse.Namespace) -> None:
    from autoprec.results.frames import pareto_front, trials_frame

    from autoprec.store.schema import verdict_of

    study = _open_study(args)
    front = pareto_front(trials_frame(study), args.max_drop)
    if args.format == "csv":
        print(front.to_csv(index=False), end="")
    elif args.format == "json":
        print(front.to_json(orient="records", indent=2))
    else:
        print(_front_table(front))
        verdict = verdict_of(study)
        if verdict:
            print(f"\nthe last search stopped early: {verdict['line']}")


def cmd_studies(args: argparse.Namespace) -> None:
    from autoprec.results.frames import studies_frame
    from autoprec.store.storage import open_storage
    from autoprec.display import format_table, number_text

    frame = studies_frame(open_storage(args.storage, readonly=True))
    if frame.empty:
        print("no autoprec studies in this store")
        return
    # names and devices come from the store (anyone's): format_table escapes control characters
    rows = [(r.study, r.trials, r.complete, r.failed, r.front, number_text(r.best_latency_ms, ".2f"),
             number_text(r.best_vs_fp32, ".3f", "x"), r.device, r.machine)
            for r in frame.itertuples()]
    print(format_table(["study", "trials", "complete", "failed", "front", "best ms", "vs fp32", "device", "machine"],
                       rows))


def _drop_limit(text: str) -> float:
    """A --max-drop of a reading command: a number >= 0 (argparse turns the error into one usage line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give an absolute score drop >= 0") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0 (an absolute score drop from fp32)")
    return value


def _output(args: argparse.Namespace):
    """The -o of a writing command, checked before the study is read (see autoprec.output)."""
    from autoprec.output import check_output
    from autoprec.store.storage import sqlite_file, storage_url

    return check_output(args.output, force=args.force, protected=[sqlite_file(storage_url(args.storage))],
                        allow_stdout=True)


def _wrote(out, what: str) -> None:
    """The line saying what was written: on stderr when the output went to a stream (standard output,
    /dev/stdout, a pipe), so it never mixes into the output itself."""
    from autoprec.display import printable

    print(f"wrote {printable(out.shown) if not out.is_stdout else 'standard output'}: {what}",
          file=sys.stderr if out.in_place else sys.stdout)


def cmd_export(args: argparse.Namespace) -> None:
    from autoprec.display import printable
    from autoprec.output import write_output
    from autoprec.store import schema
    from autoprec.results.frames import pick_trial, policy_of

    out = _output(args)
    study = _open_study(args)
    trial = pick_trial(study, args.pick, args.trial, args.max_drop)
    policy = policy_of(study, trial)
    info = schema.read_info(study)
    if args.ir is not None and info.runtime != "openvino":  # refused before anything is written
        raise AutoprecError(f"--ir: the study was timed in the {info.runtime} runtime; an OpenVINO IR is written for "
                            "a study made with --runtime openvino")
    write_output(out, policy.to_text())
    m = trial.values
    _wrote(out, f"trial {trial.number}, score {m[0]:.6g}, latency {m[1]:.2f} ms, memory {int(m[2]):,} B")
    if args.ir is not None:
        _write_ir(info, policy, args.ir)
    drop, limit = policy.measured.get("score_drop"), info.max_drop
    if drop is not None and drop > limit:
        print(f"autoprec: note: trial {trial.number} lost {drop:.3g} of the score, over the study's max drop "
              f"{limit:g}; `autoprec front --study {printable(shlex.quote(study.study_name))}` lists the trials "
              "within it", file=sys.stderr)


def _write_ir(info, policy, folder: str) -> None:
    from autoprec.measure import openvino_runtime
    from autoprec.model.model_file import load_spec

    path = openvino_runtime.save_ir(load_spec(info.model_path), policy, folder)
    print(f"autoprec: wrote {path} (OpenVINO IR of this policy)", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> None:
    from autoprec.results.html_report import write_report

    out = _output(args)
    write_report(_open_study(args), out, args.max_drop)
    _wrote(out, f"the report of study {args.study!r} (one HTML file, opens offline)")


def cmd_trials(args: argparse.Namespace) -> None:
    from autoprec.results.frames import trials_kind, write_trials

    out = _output(args)
    trials_kind(out)  # a suffix it cannot write is refused before the study is read
    write_trials(_open_study(args), out)
    _wrote(out, f"every trial of study {args.study!r}, one column per layer")


def cmd_profile(args: argparse.Namespace) -> None:
    from autoprec.guided.study_state import stored_profile
    from autoprec.guided.study_state import drop_model_of
    from autoprec.guided.planner import describe_drop_model
    from autoprec.store.schema import COSTMODEL_ATTR, PROFILE_SOURCE_ATTR
    from autoprec.display import format_table

    study = _open_study(args)
    profile = stored_profile(study)
    if profile is None:
        print(f"study {args.study!r} has no sensitivity profile yet (it is made after the uniform trials "
              "of a guided search)")
        return
    from autoprec.precision import DTYPES

    fmts = [f for f in DTYPES if f != "fp32" and any(f in v for v in profile.layers.values())]
    rows = []
    for name, by_fmt in profile.layers.items():
        row = [name, f"{by_fmt['fp32']['latency_ms']:.3f}" if "fp32" in by_fmt else "-"]
        for f in fmts:
            cell = by_fmt.get(f)
            row.append("-" if cell is None else f"{cell['drop']:.1e} / {cell['latency_ms']:.3f}")
        rows.append(row)
    print(format_table(["layer", "fp32 ms"] + [f"{f} drop / ms" for f in fmts], rows))
    print(f"\nprofile drops: {profile.method}; time: " + ", ".join(f"{k} {v:.1f} s" for k, v in profile.seconds.items()))
    if profile.model_latency_ms and profile.reference_latency_ms:
        print(f"layer times tied to the reference: the fp32 model took {profile.model_latency_ms:.4g} ms while the "
              f"layers were timed, {profile.reference_latency_ms:.4g} ms when the study was created: layer times "
              f"x {profile.time_scale:.3f} in the cost model")
    if study.user_attrs.get(PROFILE_SOURCE_ATTR):
        print(f"profile reused from study {study.user_attrs[PROFILE_SOURCE_ATTR]!r} (same model, space and machine)")
    summary = study.user_attrs.get(COSTMODEL_ATTR)
    if summary and summary["error"].get("trials"):
        e = summary["error"]
        print(f"cost model on {e['trials']} measured non-uniform trials: latency error median "
              f"{100 * e['latency_rel_median']:.1f}% (max {100 * e['latency_rel_max']:.1f}%), memory "
              f"{100 * e['memory_rel_median']:.2f}%, drop {e['drop_abs_median']:.1e} absolute (median; one linear "
              "scale per format from the uniform trials)")
        r = summary.get("error_refit") or {}
        if r.get("trials"):
            print(f"re-fitted on the trials as they come (each predicted from the others): latency error median "
                  f"{100 * r['latency_rel_median']:.1f}% (max {100 * r['latency_rel_max']:.1f}%)")
    for line in describe_drop_model(drop_model_of(study, profile)):
        print(line)


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="SQLAlchemy URL of the study store (default: $AUTOPREC_STORAGE or "
                                     "sqlite:///autoprec.db)")


def _add_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="the study's name in the store (see `autoprec studies`)")


def _add_output(p: argparse.ArgumentParser, what: str, **kwargs) -> None:
    p.add_argument("-o", "--output", help=f"{what}; - writes it to standard output", **kwargs)
    p.add_argument("--force", action="store_true",
                   help="replace an existing file at -o (never a SQLite file such as a study store)")


def _add_malloc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--malloc-defaults", action="store_true", dest="malloc_defaults",
                   help="time on the CPU with the C library's default malloc settings (glibc hands large freed "
                        "blocks back, so each forward page-faults its activations in again); by default freed "
                        "memory is kept for reuse, as jemalloc/tcmalloc deployments do")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoprec", description="Search per-layer numeric formats "
                                     "(fp32/fp16/bf16/int8) for a PyTorch model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], None]] = {}

    p = sub.add_parser("layers", help="list the searchable layers of a model.py")
    p.add_argument("model", help="path to model.py")
    p.add_argument("--space", help="search-space YAML file or shipped name (default, cpu)")
    p.add_argument("--device", default="cpu", help="device whose format support filters the choices")
    commands["layers"] = cmd_layers

    p = sub.add_parser("apply", help="apply a policy file and measure it beside fp32")
    p.add_argument("policy", help="policy JSON written by `autoprec export`")
    p.add_argument("model", help="path to model.py")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: AUTOPREC_THREADS, else all usable cores but one)")
    _add_malloc(p)
    p.add_argument("--force", action="store_true",
                   help="measure a policy exported for a model of another structure (with a warning) instead of refusing")
    commands["apply"] = cmd_apply

    p = sub.add_parser("search", help="run or resume a study")
    p.add_argument("model", help="path to model.py")
    p.add_argument("--trials", type=int, default=20, help="trials to run now (added to a resumed study)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after SEC seconds")
    _add_storage(p)
    p.add_argument("--study", help="study name (default: the model's folder name, or the file's stem)")
    p.add_argument("--space", help="search-space YAML file or shipped name (default, cpu)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--max-drop", type=float, default=None, dest="max_drop",
                   help="largest allowed absolute score drop from fp32 (default 0.01, fixed per study)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler and of training-mode fine-tuning (default 0; worker i of --workers "
                        "uses seed + i)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads, fixed per study (default: a resumed study's; for a new one AUTOPREC_THREADS, "
                        "else all usable cores but one, shared among --workers)")
    p.add_argument("--runtime", default=None, choices=["eager", "compiled", "openvino"],
                   help="how candidates run and are timed, fixed per study: eager, compiled (torch.compile; "
                        "CUDA graphs on CUDA), or openvino (OpenVINO's CPU plugin, int8 by NNCF; fp32/bf16/int8; "
                        "needs the openvino extra). Default: a resumed study's; for a new one compiled on CUDA, eager on "
                        "the CPU")
    p.add_argument("--strategy", default="guided", choices=["guided", "tpe", "nsga2", "random"],
                   help="guided: sensitivity profile + sequential knapsack proposals, then TPE (default)")
    p.add_argument("--no-prune", action="store_true", dest="no_prune",
                   help="search every format the space allows on every layer, even one the format probe finds "
                        "far slower than fp32 here (by default it keeps only its uniform policy); fixed per study")
    p.add_argument("--no-retime", action="store_true", dest="no_retime",
                   help="skip re-timing the front beside fp32 at the end")
    p.add_argument("--max-rounds", type=int, default=None, dest="max_rounds",
                   help="timing effort: interleaved rounds per measurement go from 9 up to this until the median "
                        "is known within 3%% (default 33; lower it for a quick look on a busy machine)")
    _add_malloc(p)
    p.add_argument("--workers", type=int, default=1,
                   help="local worker processes sharing the study (needs a server database, e.g. PostgreSQL)")
    p.add_argument("--devices", default=None, help="comma-separated devices, one worker each (cuda:0,cuda:1)")
    p.add_argument("--no-progress", action="store_true", dest="no_progress",
                   help="no progress bar (for logs and CI)")
    commands["search"] = cmd_search

    p = sub.add_parser("studies", help="list the studies in a store")
    _add_storage(p)
    commands["studies"] = cmd_studies

    p = sub.add_parser("front", help="the feasible Pareto front of a study")
    _add_storage(p)
    _add_study(p)
    p.add_argument("--max-drop", type=_drop_limit, default=None, dest="max_drop", help="only trials within this drop")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    commands["front"] = cmd_front

    p = sub.add_parser("profile", help="the per-layer sensitivity profile of a study and the cost model's error")
    _add_storage(p)
    _add_study(p)
    commands["profile"] = cmd_profile

    p = sub.add_parser("export", help="write a trial's policy file")
    _add_storage(p)
    _add_study(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--trial", type=int, help="trial number")
    group.add_argument("--pick", choices=["fastest", "smallest", "best-score"], help="pick from the front")
    p.add_argument("--max-drop", type=_drop_limit, default=None, dest="max_drop", help="with --pick: within this drop")
    _add_output(p, "policy JSON to write", required=True)
    p.add_argument("--ir", metavar="DIR", default=None,
                   help="also write the trial's model as an OpenVINO IR (DIR/model.xml, model.bin): a study of the "
                        "openvino runtime only")
    commands["export"] = cmd_export

    p = sub.add_parser("report", help="write an HTML report of a study (plots, front, trials)")
    _add_storage(p)
    _add_study(p)
    p.add_argument("--max-drop", type=_drop_limit, default=None, dest="max_drop", help="front only within this drop")
    _add_output(p, "HTML file to write (default report.html)", default="report.html")
    commands["report"] = cmd_report

    p = sub.add_parser("trials", help="write every trial of a study to CSV or Parquet")
    _add_storage(p)
    _add_study(p)
    _add_output(p, "trials.csv or trials.parquet (standard output: CSV)", required=True)
    commands["trials"] = cmd_trials

    parser.set_defaults(_commands=commands, _parsers=dict(sub.choices))
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; an unknown flag is reported with its subcommand's usage, not the top level's."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        args._parsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _error_text(exc: BaseException, args: argparse.Namespace) -> str:
    """An error on one printable line, with no password of the store's URL in it."""
    from autoprec.display import printable

    text = printable(exc)
    url = getattr(args, "storage", None) or os.environ.get("AUTOPREC_STORAGE")
    if url and "@" in url:
        from autoprec.store.storage import without_password

        text = without_password(text, url)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    quiet_libraries()
    try:
        args._commands[args.command](args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
    except AutoprecError as exc:
        print(f"autoprec: error: {_error_text(exc, args)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("autoprec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `autoprec front | head`: the reader has what it wanted
        # stdout's buffer still holds output for the closed pipe: point it at devnull so the exit flush is quiet
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a database error from inside Optuna or SQLAlchemy: the store failed
        from autoprec.store.storage import store_fault

        fault = store_fault(exc)
        if fault is None:
            raise
        print(f"autoprec: error: {fault}", file=sys.stderr)
        return fault.exit_code
    return 0


def run() -> None:
    """The `autoprec` program: main(), then an exit that threads model.py left running cannot hold up."""
    import traceback

    from autoprec.process import exit_process

    try:
        code = main()
    except SystemExit as exc:  # argparse's usage errors, --help
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # a bug: its traceback, and still an exit that model.py's threads cannot hold up
        traceback.print_exc()
        code = 1
    exit_process(code)


if __name__ == "__main__":
    run()
