"""An additive cost model over the sensitivity profile, and the exact proposals it yields.

For a policy with default dtype D and layer formats d_l:
    drop(policy)    = rest_drop[D] + sum_l scale[d_l] * profile_drop(l, d_l)
    latency(policy) = rest_latency[D] + sum_l latency_scale[D][d_l] * layer_latency(l, d_l | D)
                      - sum over the profile's links with both ends in static int8 of the link's saving
    memory(policy)  = rest_memory[D] + sum_l layer_memory(l, d_l)
The link term is the one place where a layer's cost depends on its neighbour's format: in the compiled
CPU runtime int8 passes between two such layers without the float tensor and quantize between them.
`rest_*[D]`, the latency scales and the int8 / fp8 drop scales are calibrated on the measured uniform
policies (all-D, all-int8, all-fp8), so the model reproduces them exactly; its error on every other
measured trial is reported.

Proposals solve a multiple-choice knapsack exactly (dynamic programming over a discretised drop
budget, with the previous layer's format as state, so a link between consecutive layers counts): the
fastest policy whose predicted drop fits each budget, for each default dtype.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoprec.guided.sensitivity import Profile

BUDGET_FRACTIONS = (0.8, 0.5, 0.3, 0.15, 0.05)
QUANTIZED = ("int8", "fp8", "int4", "int8_static")  # formats that cannot be a policy's default
_BINS = 1000
_SCALE_BOUNDS = (0.25, 4.0)  # a layer in the model vs alone: beyond this the profile is wrong, not the scale


def _bounded(scale: float) -> float:
    return min(max(scale, _SCALE_BOUNDS[0]), _SCALE_BOUNDS[1])


@dataclass
class CostModel:
    profile: Profile
    choices: dict[str, tuple[str, ...]]
    rest_latency: dict[str, float] = field(default_factory=dict)
    rest_memory: dict[str, float] = field(default_factory=dict)
    rest_drop: dict[str, float] = field(default_factory=dict)
    drop_scale: dict[str, float] = field(default_factory=lambda: {"fp32": 1.0, "fp16": 1.0, "bf16": 1.0, "int8": 1.0,
                                                                    "fp8": 1.0, "int8_static": 1.0})
    unreliable: dict[str, str] = field(default_factory=dict)  # default dtype -> why it is not planned on
    # latency_scale[D][fmt]: in-model time of a layer in fmt (rest of the model in D) / its time alone
    latency_scale: dict[str, dict[str, float]] = field(default_factory=dict)

    def layer_drop(self, name: str, fmt: str) -> float:
        return self.drop_scale.get(fmt, 1.0) * self.profile.layers[name][fmt]["drop"]

    def alone(self, default: str, name: str, fmt: str) -> float:
        """The layer's time alone, in the reference's terms (Profile.time_scale)."""
        return self.profile.time_scale * self.profile.latency_by_default[default][name][fmt]

    def layer_latency(self, default: str, name: str, fmt: str) -> float:
        return self.latency_scale.get(default, {}).get(fmt, 1.0) * self.alone(default, name, fmt)

    def link_saving(self, layers: dict[str, str]) -> float:
        """The time the links with both ends in static int8 under `layers` save, in the reference's terms."""
        return self.profile.time_scale * sum(
            link["saving_ms"] for link in self.profile.links
            if layers.get(link["producer"]) == link["producer_format"]
            and layers.get(link["consumer"]) == link["consumer_format"])

    def layers_latency(self, default: str, layers: dict[str, str]) -> float:
        """The layers' share of a policy's latency: their in-model times less what their links save."""
        return sum(self.layer_latency(default, n, f) for n, f in layers.items()) - self.link_saving(layers)

    def predict(self, default: str, layers: dict[str, str]) -> dict[str, float] | None:
        if default not in self.rest_latency:
            return None
        return {
            "drop": self.rest_drop[default] + sum(self.layer_drop(n, f) for n, f in layers.items()),
            "latency_ms": self.rest_latency[default] + self.layers_latency(default, layers),
            "memory_bytes": self.rest_memory[default] + sum(self.profile.layers[n][f]["memory_bytes"]
                                                            for n, f in layers.items()),
        }

    def calibrate(self, uniform: dict[str, tuple[str, dict[str, str], dict[str, float]]]) -> None:
        """Fit the rest-of-model terms and the latency scales from measured uniform policies.

        `uniform[fmt] = (default, layers, {"drop", "latency_ms", "memory_bytes"})`.
        """
        for quantized in QUANTIZED:  # all-int8 / all-fp8 (fp32 elsewhere): their drop scale
            if quantized not in uniform:
                continue
            default, layers, measured = uniform[quantized]
            profiled = sum(self.profile.layers[n][f]["drop"] for n, f in layers.items() if f == quantized)
            if profiled > 0 and measured["drop"] > 0 and default == "fp32":
                self.drop_scale[quantized] = measured["drop"] / profiled
        for fmt, (default, layers, measured) in uniform.items():
            if fmt in QUANTIZED or fmt != default:
                continue
            if default not in self.profile.latency_by_default:
                continue
            self.rest_memory[default] = measured["memory_bytes"] - sum(
                self.profile.layers[n][f]["memory_bytes"] for n, f in layers.items())
            self.rest_drop[default] = max(0.0, measured["drop"] - sum(self.layer_drop(n, f) for n, f in layers.items()))
        self.calibrate_latency(uniform)
        for default in list(self.rest_memory):
            self._drop_if_unphysical(default)
        for default in self.unreliable:  # predictions under it would be nonsense: not planned on
            for term in (self.rest_latency, self.rest_memory, self.rest_drop):
                term.pop(default, None)

    def _drop_if_unphysical(self, default: str) -> None:
        """A rest of the model that costs negative time or storage means the layers timed alone do not
        add up to the whole under this default (all-fp16 on a CPU without fp16 kernels, say): its
        predictions would be nonsense (a policy predicted at -847 ms), so it is not planned on. The
        fp32 default is the reference and always planned on: its rest is clamped to 0 instead, which
        keeps predictions positive and changes no choice among fp32-default policies (a constant)."""
        for term, unit in ((self.rest_latency, "ms"), (self.rest_memory, "bytes")):
            if default not in term or term[default] >= 0:
                continue
            if default == "fp32":
                term[default] = 0.0
                continue
            self.unreliable[default] = (f"rest of the model {term[default]:.4g} {unit} under default "
                                        f"{default}: the layers timed alone exceed the whole model")
            for other in (self.rest_latency, self.rest_memory, self.rest_drop):
                other.pop(default, None)
            return

    def calibrate_latency(self, uniform: dict[str, tuple[str, dict[str, str], dict[str, float]]]) -> None:
        """rest_latency[D] and latency_scale[D][fmt] from the uniform policies, each reproduced exactly
        where the terms stay in bounds.

        A layer timed alone is not the layer in the model: caches are warm or cold differently, and
        dynamic int8 quantizes its input inside the layer. So each uniform policy fixes one term:
        all-D (default D) fixes rest_latency[D] (at least 0: where the layers alone add up to more
        than the model, the excess goes into latency_scale[D][D] instead), and all-fmt (default D)
        fixes latency_scale[D][fmt]. A format with no uniform policy under D takes its scale from
        another default where it was measured, else 1. Scales stay in [1/4, 4] and the rest >= 0,
        so no prediction goes negative.
        """
        self.latency_scale = {}
        measured_scale: dict[str, float] = {}
        for fmt, (default, layers, measured) in uniform.items():
            lat = self.profile.latency_by_default.get(default)
            if fmt != default or lat is None:
                continue
            alone = sum(self.alone(default, n, f) for n, f in layers.items()) - self.link_saving(layers)
            rest = measured["latency_ms"] - alone
            scale = 1.0
            if rest < 0 and alone > 0:
                wanted = measured["latency_ms"] / alone
                rest, scale = 0.0, _bounded(wanted)
                if scale != wanted and default != "fp32":  # fp32 is the reference: always planned on
                    self.unreliable[default] = (
                        f"under default {default} the layers timed alone add up to {alone:.4g} ms against "
                        f"{measured['latency_ms']:.4g} ms for the whole model: its latency cannot be calibrated")
            self.rest_latency[default] = rest
            self.latency_scale[default] = {default: scale}
            measured_scale[default] = scale
        for fmt, (default, layers, measured) in uniform.items():
            lat = self.profile.latency_by_default.get(default)
            if fmt == default or lat is None or default not in self.rest_latency:
                continue
            own = sum(self.alone(default, n, f) for n, f in layers.items() if f == fmt)
            others = sum(self.layer_latency(default, n, f) for n, f in layers.items() if f != fmt)
            if own > 0:
                saved = self.link_saving(layers)  # measured with its links: the scale is of the layers alone
                scale = _bounded((measured["latency_ms"] + saved - self.rest_latency[default] - others) / own)
                self.latency_scale[default][fmt] = scale
                measured_scale.setdefault(fmt, scale)
        for default, scales in self.latency_scale.items():
            for fmt, scale in measured_scale.items():
                scales.setdefault(fmt, scale)

    def refit_rest_latency(self, measured: list[tuple[str, dict[str, str], dict[str, float]]]) -> None:
        """Re-fit `rest_latency[D]` on every measured trial of default D (uniform ones included): the
        median of measured latency minus the layers' summed latencies. The uniform trials alone fix
        it from one whole-model timing per default; the trials as they come add more."""
        residuals: dict[str, list[float]] = {}
        for default, layers, m in measured:
            lat = self.profile.latency_by_default.get(default)
            if lat is None or default not in self.rest_latency:
                continue
            residuals.setdefault(default, []).append(m["latency_ms"] - self.layers_latency(default, layers))
        for default, values in residuals.items():
            self.rest_latency[default] = max(0.0, statistics.median(values))

    def error(self, measured: list[tuple[str, dict[str, str], dict[str, float]]]) -> dict[str, Any]:
        """Median relative error of predicted latency and memory, and of drop in absolute terms."""
        lat, mem, drop = [], [], []
        for default, layers, m in measured:
            p = self.predict(default, layers)
            if p is None:
                continue
            lat.append(abs(p["latency_ms"] - m["latency_ms"]) / m["latency_ms"])
            mem.append(abs(p["memory_bytes"] - m["memory_bytes"]) / m["memory_bytes"])
            drop.append(abs(p["drop"] - m["drop"]))
        if not lat:
            return {"trials": 0}
        return {"trials": len(lat), "latency_rel_median": statistics.median(lat), "latency_rel_max": max(lat),
                "memory_rel_median": statistics.median(mem), "drop_abs_median": statistics.median(drop)}

    def fastest_within(self, default: str, budget: float, objective: str = "latency_ms") -> dict[str, str] | None:
        """The policy minimising predicted `objective` with predicted drop <= budget (exact up to the
        drop discretisation, which rounds drops up, so the budget is never exceeded)."""
        if default not in self.rest_latency:
            return None
        budget -= self.rest_drop[default]
        if budget < 0:
            return None
        unit = budget / _BINS if budget > 0 else 1.0
        options: list[list[tuple[str, int, float]]] = []  # per layer: (format, drop bins, cost) it may take
        for name, formats in self.choices.items():
            options.append([])
            for fmt in formats:
                drop = self.layer_drop(name, fmt)
                if not math.isfinite(drop):
                    continue
                weight = 0 if drop <= 0 else (math.ceil(drop / unit) if budget > 0 else _BINS + 1)
                if weight > _BINS:
                    continue
                cost = (self.layer_latency(default, name, fmt) if objective == "latency_ms"
                        else self.profile.layers[name][fmt]["memory_bytes"])
                options[-1].append((fmt, weight, cost))
        links = self._consecutive_links(list(self.choices)) if objective == "latency_ms" else {}
        chosen = _cheapest_within(options, links)
        return None if chosen is None else dict(zip(self.choices, chosen))

    def _consecutive_links(self, names: list[str]) -> dict[int, tuple[str, str, float]]:
        """index i -> (producer format, consumer format, saving) for a link from names[i-1] into names[i]:
        the links the knapsack sees exactly (a link between layers further apart is predicted, not planned)."""
        index = {name: i for i, name in enumerate(names)}
        out = {}
        for link in self.profile.links:
            i = index.get(link["consumer"])
            if i is not None and i > 0 and names[i - 1] == link["producer"]:
                out[i] = (link["producer_format"], link["consumer_format"],
                          self.profile.time_scale * link["saving_ms"])
        return out


def _cheapest_within(options: list[list[tuple[str, int, float]]],
                     links: dict[int, tuple[str, str, float]]) -> list[str] | None:
    """The multiple-choice knapsack: one (format, weight, cost) option per layer, total weight <= _BINS,
    least total cost less the savings of `links` (index i -> producer format, consumer format, saving
    for a link from layer i-1 into layer i) both of whose ends are chosen. Dynamic programming over the
    weight with the previous layer's option as state; the first option wins a tie. None if nothing fits."""
    inf = math.inf
    start = np.full(_BINS + 1, inf)
    start[0] = 0.0
    # states[j][b]: the least cost of the layers so far at total weight b, the last layer taking option j
    states, previous = [start], [""]
    picks: list[np.ndarray] = []  # picks[i][j][b]: the previous layer's option on that path
    rows = np.arange(_BINS + 1)
    for i, layer in enumerate(options):
        link = links.get(i)
        new_states, new_picks = [], []
        for fmt, weight, cost in layer:
            before = np.stack([state - (link[2] if link and prev == link[0] and fmt == link[1] else 0.0)
                               for prev, state in zip(previous, states)])
            came = np.argmin(before, axis=0)
            shifted, source = np.full(_BINS + 1, inf), np.zeros(_BINS + 1, dtype=np.int16)
            shifted[weight:] = before[came, rows][:_BINS + 1 - weight] + cost
            source[weight:] = came[:_BINS + 1 - weight]
            new_states.append(shifted)
            new_picks.append(source)
        if not new_states:
            return None
        states, previous = new_states, [fmt for fmt, _, _ in layer]
        picks.append(np.stack(new_picks))
    final = np.stack(states)
    end = int(np.argmin(final.min(axis=0)))
    j = int(np.argmin(final[:, end]))
    if not math.isfinite(final[j, end]):
        return None
    chosen = []
    for i in range(len(options) - 1, -1, -1):
        fmt, weight, _ = options[i][j]
        chosen.append(fmt)
        j = int(picks[i][j][end])
        end -= weight
    return chosen[::-1]


def knapsack_proposals(model: CostModel, max_drop: float, defaults: tuple[str, ...]) -> list[tuple[str, dict[str, str], str]]:
    """(default, layers, why) for a range of drop budgets under max_drop, deduplicated: the fastest (and
    at the smallest budget the smallest) policy the model predicts within each budget."""
    seen, out = set(), []
    for default in defaults:
        for fraction in BUDGET_FRACTIONS:
            for objective in ("latency_ms", "memory_bytes") if fraction == BUDGET_FRACTIONS[0] else ("latency_ms",):
                layers = model.fastest_within(default, fraction * max_drop, objective)
                if layers is None:
                    continue
                key = (default, tuple(sorted(layers.items())))
                if key not in seen:
                    seen.add(key)
                    word = "fastest" if objective == "latency_ms" else "smallest"
                    out.append((default, layers, f"knapsack {word}, drop <= {fraction:g} x max_drop"))
    # fastest predicted first, whatever its default dtype: a short budget measures the best bets
    return sorted(out, key=lambda p: model.predict(p[0], p[1])["latency_ms"])
