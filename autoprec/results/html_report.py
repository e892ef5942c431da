"""Results people read: a self-contained HTML report of a study, and the trials as a data file.

`write_report(study, "report.html")` writes one HTML file that needs no network to view: the plots
are matplotlib SVG inlined in the page (text kept as text, so trial numbers and layer names can be
searched with the browser's find), the tables are plain HTML, the styles are inline, and there is no
JavaScript. Sections: summary, Pareto front (score drop against latency and against memory, with the
uniform policies and the fp32 reference marked), why the last search stopped early where it did
(study attribute ``autoprec_verdict``), the front as a table, a map of the front's
policies (layers x front members, coloured by format), the sensitivity profile (study attribute
``autoprec_profile``) when there is one, every trial with failures and skipped proposals and their reasons, and the
environment the study was measured in.

Needs matplotlib: ``pip install autoprec[report]``.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import io
import math
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from autoprec.errors import AutoprecError
from autoprec.precision import DTYPES
from autoprec.store import schema
from autoprec.store.schema import PROFILE_ATTR, RETIMED_ATTR, Origin, StudyInfo
from autoprec.results.frames import machine_of, output_of, pareto_front, trial_machines, trials_table
from autoprec.output import Output, write_output

# Okabe-Ito colours: readable for colour-blind readers and in greyscale print.
DTYPE_COLORS = {"fp32": "#0072B2", "fp16": "#E69F00", "bf16": "#009E73", "int8": "#D55E00", "fp8": "#CC79A7", "int4": "#56B4E9",
                "int8_static": "#882255"}
_MISSING_COLOR = "#dddddd"


# --------------------------------------------------------------------------------------------
# plots


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise AutoprecError("the HTML report needs matplotlib; pip install 'autoprec[report]'") from None
    return matplotlib, Figure


_STYLE = {"font.size": 9, "font.family": "sans-serif",
          "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica", "sans-serif"],
          "svg.fonttype": "none"}  # text stays <text>: searchable, small, drawn with the browser's fonts


def _styled(plot: Callable[..., str]) -> Callable[..., str]:
    """Run a plotting function under the report's matplotlib style, leaving the caller's rcParams alone."""
    @functools.wraps(plot)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        matplotlib, _ = _matplotlib()
        with matplotlib.rc_context(_STYLE):
            return plot(*args, **kwargs)
    return wrapper


def _svg(fig) -> str:
    """The figure as inline SVG without the XML prologue."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def _new_figure(width: float, height: float):
    _, Figure = _matplotlib()
    return Figure(figsize=(width, height), layout="constrained")


def _memory_unit(values: list[float]) -> tuple[float, str]:
    top = max([v for v in values if v is not None and math.isfinite(v)] or [1.0])
    for scale, unit in ((1024 ** 3, "GiB"), (1024 ** 2, "MiB"), (1024, "KiB")):
        if top >= scale:
            return scale, unit
    return 1.0, "B"


def _symlog_threshold(drops: list[float]) -> float:
    positive = [abs(d) for d in drops if d is not None and math.isfinite(d) and d != 0]
    if not positive:
        return 1e-6
    return 10.0 ** math.floor(math.log10(min(positive)))


def _uniform_dtype(origin: Any) -> str | None:
    parsed = Origin.parse(origin)
    return parsed.format if parsed.kind == schema.UNIFORM else None


@_styled
def front_plot(frame: pd.DataFrame, front: pd.DataFrame, info: StudyInfo) -> str:
    """Two panels sharing the y axis: score drop against latency, and against memory."""
    ref = dataclasses.asdict(info.reference)
    max_drop = float(info.max_drop)
    done = frame[frame.state == "COMPLETE"] if not frame.empty else frame
    fig = _new_figure(11, 4.6)
    axes = fig.subplots(1, 2, sharey=True)
    if done.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no complete trial yet", ha="center", va="center", transform=ax.transAxes)
        return _svg(fig)
    drops = [ref["score"] - s for s in done.score]
    threshold = _symlog_threshold(drops + [max_drop])
    scale, unit = _memory_unit(list(done.memory_bytes) + [ref["memory_bytes"]])
    front_numbers = set(front.trial) if not front.empty else set()
    for ax, column, ref_x, div, label in (
        (axes[0], "latency_ms", ref["latency_ms"], 1.0, "latency (ms), lower is better"),
        (axes[1], "memory_bytes", ref["memory_bytes"], scale, f"memory ({unit}), lower is better"),
    ):
        rest = done[~done.trial.isin(front_numbers)]
        feasible, infeasible = rest[rest.feasible], rest[~rest.feasible]
        ax.scatter(feasible[column] / div, ref["score"] - feasible.score, s=22, c="#9a9a9a", alpha=0.8,
                   label="feasible, dominated", zorder=2)
        ax.scatter(infeasible[column] / div, ref["score"] - infeasible.score, s=26, c="#9a9a9a", marker="x",
                   label="infeasible (over max drop)", zorder=2)
        on_front = done[done.trial.isin(front_numbers)]
        ax.scatter(on_front[column] / div, ref["score"] - on_front.score, s=46, facecolor="#cc3311",
                   edgecolor="black", linewidth=0.6, label="Pareto front", zorder=4)
        for row in on_front.itertuples():
            ax.annotate(f"#{int(row.trial)}", (getattr(row, column) / div, ref["score"] - row.score),
                        xytext=(4, 4), textcoords="offset points", fontsize=8, color="#cc3311", zorder=5)
        for row in done.itertuples():
            fmt = _uniform_dtype(row.origin)
            if fmt is None:
                continue
            x, y = getattr(row, column) / div, ref["score"] - row.score
            ax.scatter([x], [y], s=90, marker="s", facecolor="none", linewidth=1.8,
                       edgecolor=DTYPE_COLORS.get(fmt, "black"), zorder=3)
            ax.annotate(f"all {fmt}", (x, y), xytext=(5, -11), textcoords="offset points", fontsize=8,
                        color=DTYPE_COLORS.get(fmt, "black"), zorder=5)
        ax.scatter([ref_x / div], [0.0], s=160, marker="*", c="black", label="fp32 reference", zorder=6)
        ax.axvline(ref_x / div, color="black", linestyle=":", linewidth=0.8)
        ax.axhline(max_drop, color="#cc3311", linestyle="--", linewidth=0.9, label=f"max drop {max_drop:g}")
        ax.set_yscale("symlog", linthresh=threshold)
        xs = [v / div for v in list(done[column]) + [ref_x] if v is not None and v > 0]
        if xs and max(xs) / min(xs) > 20:  # an outlier would squash everything else against the axis
            ax.set_xscale("log")
            label = label.replace("),", ", log scale),")
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].invert_yaxis()  # shared: smaller drop (better score) at the top
    axes[0].set_ylabel(f"score drop from fp32 (score {ref['score']:.6f})\nsymmetric log scale, better is up")
    axes[0].set_title("Score against latency")
    axes[1].set_title("Score against memory")
    handles, labels = axes[0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], marker="s", linestyle="none", markerfacecolor="none", markeredgecolor="black",
                          markersize=8, markeredgewidth=1.6))
    labels.append("uniform policy (all one format)")
    fig.legend(handles, labels, loc="outside lower center", ncol=6, fontsize=8, frameon=False)
    return _svg(fig)


@_styled
def policy_map(front: pd.DataFrame, layers: list[str]) -> str:
    """Layers (rows) x front members (columns, fastest first), each cell coloured by its format."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows = ["(default)"] + list(layers)
    codes = {d: i for i, d in enumerate(DTYPES)}
    matrix = []
    for name in rows:
        column = "default" if name == "(default)" else f"layer:{name}"
        values = front[column] if column in front else [None] * len(front)
        matrix.append([codes.get(v, len(DTYPES)) if isinstance(v, str) else len(DTYPES) for v in values])
    label_width = max(len(r) for r in rows)
    width = min(4.0 + 0.06 * label_width + 0.42 * len(front), 40.0)
    height = min(1.6 + 0.19 * len(rows), 80.0)
    fig = _new_figure(width, height)
    ax = fig.subplots()
    cmap = ListedColormap([DTYPE_COLORS[d] for d in DTYPES] + [_MISSING_COLOR])
    ax.imshow(matrix, cmap=cmap, vmin=-0.5, vmax=len(DTYPES) + 0.5, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(front)))
    ax.set_xticklabels([f"#{int(r.trial)}\n{r.latency_ms:.3g} ms" for r in front.itertuples()], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7 if len(rows) < 80 else 5)
    ax.set_xticks([x - 0.5 for x in range(1, len(front))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(rows))], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("front members, fastest first (trial, latency)")
    ax.xaxis.set_label_position("top")
    used = sorted({v for row in matrix for v in row})
    names = list(DTYPES) + ["not set"]
    ax.legend(handles=[Patch(color=cmap(i), label=names[i]) for i in used], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _svg(fig)


def _profile_matrix(profile: dict[str, Any]) -> tuple[list[str], list[str], list[list[float]], list[list[float]]]:
    """Validated rows of the profile: layers, dtypes, drop[layer][dtype], latency_ms[layer][dtype]."""
    layers = profile.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError("'layers' is missing or empty")
    seen = set()
    for name, per_dtype in layers.items():
        if not isinstance(per_dtype, dict):
            raise ValueError(f"layer {name!r}: expected {{dtype: {{drop, latency_ms}}}}")
        seen.update(per_dtype)
    dtypes = [d for d in DTYPES if d in seen] + sorted(seen - set(DTYPES))

    def number(layer: str, dtype: str, key: str) -> float:
        cell = layers[layer].get(dtype)
        value = cell.get(key) if isinstance(cell, dict) else None
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan

    names = list(layers)
    drops = [[number(n, d, "drop") for d in dtypes] for n in names]
    latency = [[number(n, d, "latency_ms") for d in dtypes] for n in names]
    return names, dtypes, drops, latency


@_styled
def profile_plot(profile: dict[str, Any]) -> str:
    """Heat map of the score drop per layer x format (log colour), beside each layer's latency."""
    from matplotlib.colors import LogNorm

    names, dtypes, drops, latency = _profile_matrix(profile)
    positive = [v for row in drops for v in row if v > 0]
    floor = min(positive) if positive else 1e-9
    top = max(positive) if positive else 1e-8
    shown = [[(max(v, floor) if not math.isnan(v) else math.nan) for v in row] for row in drops]
    label_width = max(len(n) for n in names)
    fig = _new_figure(min(7.0 + 0.06 * label_width + 0.9 * len(dtypes), 30.0), min(1.8 + 0.22 * len(names), 80.0))
    ax_drop, ax_lat = fig.subplots(1, 2, sharey=True, width_ratios=[max(len(dtypes), 2), 4])
    image = ax_drop.imshow(shown, cmap="magma_r", norm=LogNorm(vmin=floor, vmax=max(top, floor * 10)),
                           aspect="auto", interpolation="nearest")
    if len(names) * len(dtypes) <= 600:
        for i, row in enumerate(drops):
            for j, value in enumerate(row):
                if math.isnan(value):
                    continue
                text = "0" if value == 0 else (f"{value:.1e}" if value > 0 else f"{value:.0e}")
                dark = value > 0 and math.log(max(value, floor)) > (math.log(floor) + math.log(max(top, floor * 10))) / 2
                ax_drop.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if dark else "black")
    ax_drop.set_xticks(range(len(dtypes)))
    ax_drop.set_xticklabels(dtypes)
    ax_drop.xaxis.tick_top()
    ax_drop.set_yticks(range(len(names)))
    ax_drop.set_yticklabels(names, fontsize=7 if len(names) < 80 else 5)
    ax_drop.set_title("drop with only this layer changed (log colour)", fontsize=9)
    fig.colorbar(image, ax=ax_drop, location="bottom", shrink=0.8, label="drop (0 or below shown at the lightest)")
    height = 0.8 / max(len(dtypes), 1)
    for j, dtype in enumerate(dtypes):
        ys = [i - 0.4 + height * (j + 0.5) for i in range(len(names))]
        values = [row[j] for row in latency]
        ax_lat.barh(ys, [0 if math.isnan(v) else v for v in values], height=height,
                    color=DTYPE_COLORS.get(dtype, "#777777"), label=dtype)
    ax_lat.set_xlabel("latency of the layer in that format (ms)")
    ax_lat.set_title("layer latency", fontsize=9)
    ax_lat.grid(True, axis="x", alpha=0.3)
    handles, labels = ax_lat.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower right", ncol=len(dtypes), fontsize=8, frameon=False,
               title="layer latency in", title_fontsize=8)
    return _svg(fig)


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; color: #222;
       max-width: 1250px; margin: 1.5em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 1em 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 0.9em; min-width: 8em; }
.card b { display: block; font-size: 1.3em; }
.figure { overflow-x: auto; } .figure svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.front td { background: #fff1ec; font-weight: 600; }
p.verdict { background: #eef4fb; border-left: 4px solid #3366aa; padding: 6px 10px; max-width: 70em; }
tr.fail td { background: #fbeaea; color: #8a1f1f; }
tr.infeasible td { color: #777; }
td.warn { background: #fff3c4 !important; color: #7a5a00; }
.reason { min-width: 16em; }
.scroll { max-height: 640px; overflow: auto; border: 1px solid #eee; }
.note { color: #555; font-size: 0.92em; }
.dtype { display: inline-block; padding: 0 5px; border-radius: 3px; color: white; font-size: 11px; }
dl.env { display: grid; grid-template-columns: max-content auto; gap: 2px 1.2em; }
dl.env dt { font-weight: 600; } dl.env dd { margin: 0; font-family: monospace; }
"""


def _e(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return html.escape(str(value))


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _bytes(value: Any) -> str:
    from autoprec.display import format_bytes

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format_bytes(float(value))


def _dtype_badge(dtype: Any) -> str:
    if not isinstance(dtype, str):
        return "-"
    return f'<span class="dtype" style="background:{DTYPE_COLORS.get(dtype, "#777")}">{_e(dtype)}</span>'


def _trial_rows(frame: pd.DataFrame, front_numbers: set[int], retimed: dict[str, Any] | None = None) -> str:
    lines = []
    for r in frame.itertuples():
        number = int(r.trial)
        if number in front_numbers:
            css, mark = "front", "&#9733; "
        elif r.state == "FAIL":
            css, mark = "fail", ""
        elif r.state == "COMPLETE" and not r.feasible:
            css, mark = "infeasible", ""
        else:
            css, mark = "", ""
        lines.append(
            f'<tr class="{css}" data-trial="{number}"><td class="num">{mark}{number}</td><td>{_e(r.state)}</td>'
            f"<td>{_e(r.origin)}</td><td class=num>{_num(r.score, '.6f')}</td>"
            f"<td class=num>{_num(r.score_drop, '.2e')}</td><td class=num>{_num(r.latency_ms, '.3f')}</td>"
            f"{_spread_cell(r.latency_spread)}"
            f"<td class=num>{_num(getattr(r, 'latency_ratio', None), '.3f')}</td>"
            f"<td class=num>{_bytes(r.memory_bytes)}</td><td class=num>{_num(getattr(r, 'memory_ratio', None), '.3f')}</td>"
            f"<td class=num>{_bytes(r.peak_bytes)}</td><td>{'yes' if r.feasible else 'no'}</td>"
            f"<td>{_dtype_badge(r.default)}</td>"
            + "".join(f"<td class=num>{int(getattr(r, d))}</td>" for d in DTYPES)
            + f"<td class=num>{_num(r.duration_s, '.1f')}</td><td class=num>{_num(getattr(r, 'compile_s', None), '.1f')}</td>"
            + f"<td class=reason>{_e(r.reason)}</td>"
            + (_retimed_cell(retimed.get(str(number)), bool(getattr(r, "not_retimed", False)))
               if retimed is not None else "") + "</tr>")
    return "\n".join(lines)


NOISY_SPREAD = 2.0  # max/min of a trial's per-round latency ratios above which its latency is flagged


def _spread_cell(spread: Any) -> str:
    if not isinstance(spread, (int, float)) or math.isnan(spread):
        return "<td class=num>-</td>"
    css = "num warn" if spread > NOISY_SPREAD else "num"
    return f'<td class="{css}">{spread:.3g}</td>'


def _retimed_cell(entry: Any, left_out: bool = False) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("latency_ms"), (int, float)):
        return "<td class=num>not re-timed</td>" if left_out else "<td class=num>-</td>"
    if entry.get("wider"):  # noisier than the search's own measurement: the search's number stands
        lo, hi = entry.get("lo"), entry.get("hi")
        span = f" {lo:.2f}-{hi:.2f}x fp32" if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) else ""
        return (f'<td class="num warn" title="the re-time{span} was noisier than the search\'s own '
                'measurement; the search\'s latency stands">too noisy</td>')
    spread = entry.get("spread")
    title = f' title="max/min of the per-round ratios {spread:.3f}"' if isinstance(spread, (int, float)) else ""
    return f"<td class=num{title}>{entry['latency_ms']:.3f}</td>"


_TRIAL_HEAD = ("<tr><th>trial</th><th>state</th><th>origin</th><th>score</th><th>drop</th><th>latency ms</th>"
               '<th title="max/min of the per-round latency ratios to fp32; large means noisy timing">spread</th>'
               "<th>vs fp32</th><th>memory</th><th>vs fp32</th><th>peak</th><th>feasible</th><th>default</th>"
               + "".join(f"<th>{d}</th>" for d in DTYPES) + "<th>time s</th>"
               '<th title="torch.compile time of the trial (compiled runtime)">compile s</th>'
               '<th class="reason">failure reason</th></tr>')


def _profile_section(study: optuna.Study) -> str:
    profile = study.user_attrs.get(PROFILE_ATTR)
    head = '<h2 id="sensitivity">Sensitivity profile</h2>'
    if profile is None:
        return (head + '<p class="note" id="no-profile">This study has no sensitivity profile (no '
                f"<code>{PROFILE_ATTR}</code> study attribute): none was measured for it.</p>")
    try:
        figure = profile_plot(profile)
    except (ValueError, TypeError, AttributeError) as exc:
        return head + f'<p class="note">The study\'s <code>{PROFILE_ATTR}</code> attribute cannot be read: {_e(exc)}.</p>'
    ref = profile.get("reference_latency_ms")
    note = (f" The whole fp32 model takes {ref:.3f} ms." if isinstance(ref, (int, float)) else "")
    return (head + '<p class="note">Each layer changed alone from fp32 to a format, the rest of the model left '
            "in fp32: the drop it causes (autoprec's guided search measures it as output fidelity, 1 &minus; "
            "cosine similarity to the fp32 output on <code>example_inputs()</code>, whatever the study's "
            "score; its cost model calibrates the sum to the score) and the layer's own latency in that "
            f"format, timed alone on its captured input.{_e(note)}</p>"
            f'<div class="figure" id="profile-plot">{figure}</div>')


def _verdict_note(study: optuna.Study) -> str:
    """The line that says why the last search stopped before its --trials, beside the front."""
    verdict = schema.verdict_of(study)
    if verdict is None:
        return ""
    return (f'<p class="verdict" id="verdict"><b>The last search stopped early:</b> {_e(verdict["line"])}</p>')


def build_report(study: optuna.Study, max_drop: float | None = None) -> str:
    """The report of `study` as one self-contained HTML document."""
    info = schema.read_info(study)
    ref = dataclasses.asdict(info.reference)
    env = info.environment
    frame = trials_table(study)
    front = pareto_front(frame, max_drop) if not frame.empty else frame
    front_numbers = {int(n) for n in front.trial} if not front.empty else set()
    layers = list(info.layers)
    n = len(frame)
    states = frame.state.value_counts().to_dict() if n else {}
    infeasible = int(((frame.state == "COMPLETE") & ~frame.feasible).sum()) if n else 0
    best = front.latency_ms.min() if not front.empty else None
    study_drop = float(info.max_drop)
    retimed_attr = study.user_attrs.get(RETIMED_ATTR)
    retimed = retimed_attr.get("trials") if isinstance(retimed_attr, dict) else None
    retimed = retimed if isinstance(retimed, dict) else None
    drop_note = f" (filtered to drop &le; {max_drop:g})" if max_drop is not None else ""

    cards = [("trials", n), ("complete", states.get("COMPLETE", 0)), ("failed", states.get("FAIL", 0)),
             ("infeasible", infeasible), ("on the front", len(front))]
    cards += [(state.lower(), states[state]) for state in ("RUNNING", "WAITING") if states.get(state)]
    if states.get("PRUNED"):  # sampler proposals not worth measuring (autoprec.guided.verdict)
        cards.append(("skipped", states["PRUNED"]))
    cards += [("fp32 latency", f"{ref['latency_ms']:.3f} ms"),
              ("fastest on front", f"{best:.3f} ms ({best / ref['latency_ms']:.2f}x)" if best else "-"),
              ("fp32 memory", _bytes(ref["memory_bytes"]))]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>autoprec report: {_e(study.study_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>autoprec study <code>{_e(study.study_name)}</code></h1>",
        f'<p class="sub">{_e(info.model_class)} from {_e(info.model_path)}, '
        f'{len(layers)} searchable layers, space <code>{_e(info.space.get("name"))}</code>, '
        f'on {_e(env.get("device"))} ({_e(machine_of(info))}), {_e(info.runtime)} runtime; max drop {study_drop:g}; '
        f'report written {_e(time.strftime("%Y-%m-%d %H:%M"))}</p>',
        '<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in cards) + "</div>",
        '<h2 id="front">Pareto front</h2>',
        '<p class="note">Every complete trial; the feasible Pareto front (best score, latency and memory '
        f"together){drop_note} in red with its trial numbers; squares are the uniform policies, the star "
        "the fp32 reference measured when the study was created. The y axis is the score drop from fp32 on "
        "a symmetric log scale (zero at the top). Failed trials have no measurement and are listed below."
        "</p>",
        f'<div class="figure" id="front-plot">{front_plot(frame, front, info)}</div>',
        _verdict_note(study),
    ]
    if front.empty:
        parts.append('<p id="front-table">No feasible trial yet: run more trials or loosen --max-drop.</p>')
    else:
        parts += [
            '<h3>Front members</h3>',
            '<p class="note">Fastest first. <i>re-timed ms</i>: the front measured again together beside the '
            "fp32 model at the end of the last search run, so these latencies compare with each other "
            "best; fastest and smallest first, within 15% of the search's time (the rest: not re-timed).</p>" if retimed is not None else "",
            '<div class="scroll"><table id="front-table">',
            _TRIAL_HEAD.replace("</tr>", "<th>re-timed ms</th></tr>") if retimed is not None else _TRIAL_HEAD,
            _trial_rows(front, set(), retimed), "</table></div>",
            '<h2 id="policies">Policies on the front</h2>',
            '<p class="note">One column per front member, fastest first; <code>(default)</code> is the format '
            "of everything that is not a searchable layer (norms, embeddings, attention products). Export one "
            f"with <code>autoprec export --study {_e(shlex.quote(study.study_name))} --trial N -o policy.json"
            "</code>.</p>",
            f'<div class="figure" id="policy-map">{policy_map(front, layers)}</div>',
        ]
    parts.append(_profile_section(study))
    parts += [
        '<h2 id="trials">All trials</h2>',
        '<p class="note">&#9733; on the front; red rows failed (the reason says why); grey rows are over '
        "the maximum score drop; a yellow <i>spread</i> marks a latency measured with noisy timing (the "
        f"per-round ratios to fp32 differ by more than {NOISY_SPREAD:g}x). <code>autoprec trials --study NAME -o trials.csv</code> writes this table "
        "with one column per layer.</p>",
        f'<div class="scroll"><table id="trials-table">{_TRIAL_HEAD}{_trial_rows(frame, front_numbers)}</table></div>',
        '<h2 id="environment">Environment</h2><dl class="env">',
    ]
    env_rows = {**{k: v for k, v in env.items()}, "model": f"{info.model_class} ({info.model_path})",
                "model fingerprint": info.model_fingerprint,
                "runtime": info.runtime, "search space": info.space.get("name"), "max drop": study_drop,
                "fp32 score": f"{ref['score']:.6f}", "fp32 latency": f"{ref['latency_ms']:.3f} ms",
                "fp32 memory": f"{int(ref['memory_bytes']):,} B", "study created": info.created,
                "optuna": optuna.__version__, "machine kind": machine_of(info)}
    for text, count in trial_machines(study).items():  # trials from before a study's kind was checked
        env_rows[f"{count} trials timed on"] = text
    parts += [f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in env_rows.items()]
    parts += ["</dl></body></html>"]
    return "\n".join(parts)


def write_report(study: optuna.Study, path: str | Path | Output, max_drop: float | None = None) -> Path | None:
    """Write the report (autoprec.output's rules); returns the file written (None: standard output)."""
    out = output_of(path)
    write_output(out, build_report(study, max_drop))
    return out.target
