"""Opening a study for a search: check the config, load the model spec and the space, open the
store, then create the study (the first worker measures the fp32 reference) or wait for its
creator, refuse a resume that would measure differently, and fix the CPU thread count.

`open_study(config)` returns an `OpenedStudy`: everything the trial loop (autoprec.search.loop) needs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import torch

from autoprec.measure import format_probe

from autoprec.store import schema

from autoprec.measure import openvino_runtime
from autoprec.measure import runtime as runtimes
from autoprec.errors import AutoprecError, StoreError
from autoprec.measure.evaluator import Evaluator
from autoprec.store.worker_tables import Ledger
from autoprec.measure.machine import configure_cpu, default_threads, environment, prepare_allocator, resolve_device, usable_cores
from autoprec.policy import model_fingerprint
from autoprec.precision import DTYPES, module_storage_bytes
from autoprec.precision.layers import is_searchable
from autoprec.store.schema import Origin, Reference, StudyInfo
from autoprec.search.space import SearchSpace, load_space
from autoprec.store.storage import discard_if_unused, open_storage, sqlite_file, storage_url, study_names
from autoprec.display import threads_text
from autoprec.model.model_file import ModelSpec, describe_inputs, load_spec

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

    from autoprec.search.config import SearchConfig

OBJECTIVES = ("score", "latency_ms", "memory_bytes")
DIRECTIONS = ("maximize", "minimize", "minimize")
DEFAULT_MAX_DROP = 0.01
STRATEGIES = ("guided", "tpe", "nsga2", "random")
CLAIM_STALE_S = float(os.environ.get("AUTOPREC_CLAIM_STALE_S", "900"))


def inductor_cache_dir(url: str) -> Path | None:
    """Where inductor keeps its on-disk caches for a study store: beside a SQLite file
    (`autoprec.db` -> `autoprec.db.inductor/`); for a server store the working folder's
    `autoprec.inductor/`; None for an in-memory store (inductor's own default then)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):].split("?", 1)[0]
        return None if path in ("", ":memory:") else Path(path + ".inductor")
    if url.startswith("sqlite:"):
        return None
    return Path("autoprec.inductor")


def default_study_name(model_path: str | Path) -> str:
    path = Path(model_path).resolve()
    return path.parent.name if path.stem == "model" else path.stem


@dataclass
class OpenedStudy:
    config: SearchConfig
    spec: ModelSpec
    space: SearchSpace
    device: torch.device
    choices: dict[str, tuple[str, ...]]
    study_name: str
    storage_url: str
    storage: RDBStorage
    evaluator: Evaluator
    info: StudyInfo
    threads: int | None
    pruning: format_probe.Pruning | None = None  # formats left out of per-layer search (None: nothing)
    machine_kind: dict[str, str] | None = None  # this process's machine kind, the study's (checked on opening)

    @property
    def ledger(self) -> Ledger:
        return self.storage.ledger  # type: ignore[attr-defined]


# Optuna's studies.study_name column (and autoprec's tables beside it) is VARCHAR(512): PostgreSQL refuses a
# longer name half way through creating the study, SQLite would keep it; both refuse it here, before anything.
def _max_study_name() -> int:
    try:
        from optuna.storages._rdb.models import StudyModel

        return int(StudyModel.__table__.c.study_name.type.length or 512)
    except Exception:  # another Optuna layout: its documented schema's length
        return 512


MAX_STUDY_NAME = _max_study_name()


def check_config(config: SearchConfig) -> None:
    """Refuse a bad option before anything is loaded or written."""
    if config.strategy not in STRATEGIES:
        raise AutoprecError(f"--strategy {config.strategy!r}: use one of {', '.join(STRATEGIES)}")
    if config.max_drop is not None and not config.max_drop >= 0:
        raise AutoprecError(f"--max-drop {config.max_drop}: must be a number >= 0 (an absolute score drop)")
    if config.workers < 1:
        raise AutoprecError(f"--workers {config.workers}: must be at least 1")
    if config.trials is None or config.trials < 0:
        raise AutoprecError(f"--trials {config.trials}: give 0 or more trials to run now")
    if config.timeout is not None and not config.timeout > 0:
        raise AutoprecError(f"--timeout {config.timeout}: give a number of seconds above 0, or leave it out")
    if config.study is not None and not config.study.strip():
        raise AutoprecError("--study '': give the study a name, or leave --study out for the model's folder name")
    if config.study is not None and len(config.study) > MAX_STUDY_NAME:
        raise AutoprecError(f"--study: the name has {len(config.study)} characters; a study store keeps at most "
                            f"{MAX_STUDY_NAME}: give a shorter name")
    if config.runtime is not None:
        runtimes.check_runtime(config.runtime)
    if config.runtime == "openvino":
        openvino_runtime.require_openvino()


def openvino_space(space: SearchSpace, choices: dict[str, tuple[str, ...]]
                   ) -> tuple[SearchSpace, dict[str, tuple[str, ...]]]:
    """The space and choices cut to the formats the openvino runtime runs (fp32, bf16, int8), with one
    line naming what was dropped: OpenVINO's CPU plugin runs no fp16, fp8 or int4 layer."""
    keep = openvino_runtime.FORMATS
    dropped = sorted({d for c in choices.values() for d in c if d not in keep} |
                     {d for d in space.dtypes + space.default_dtypes if d not in keep})
    if dropped:
        print(f"autoprec: --runtime openvino searches {', '.join(keep)}; left out: {', '.join(dropped)}",
              file=sys.stderr)
    cut = {name: tuple(d for d in c if d in keep) for name, c in choices.items()}
    cut = {name: c for name, c in cut.items() if c}
    defaults = tuple(d for d in space.default_dtypes if d in keep) or ("fp32",)
    return dataclasses.replace(space, dtypes=tuple(d for d in space.dtypes if d in keep) or ("fp32",),
                               default_dtypes=defaults), cut


def default_runtime(device: torch.device) -> str:
    """compiled on CUDA (an eager forward of a small batch is bound by kernel launches: MiniLM's bf16
    ran no faster than fp32 on an H200), eager on the CPU (compiling moved MiniLM's format ratios by a
    few percent, made ResNet-18 slower, and costs seconds per new block assignment; README, Runtimes)."""
    return "compiled" if device.type == "cuda" else "eager"


def study_runtime(device: torch.device, stored: str | None, requested: str | None, name: str) -> str:
    """The runtime a study times in: chosen when it is created, kept by every resume and worker,
    because the formats' ratios to fp32 and even their order change with it."""
    if stored is None:
        return requested or default_runtime(device)
    if requested is not None and requested != stored:
        raise StoreError(f"study {name!r} times candidates in the {stored} runtime, and latency ratios change with "
                         f"the runtime; drop --runtime {requested} (a resume keeps the study's), or start a new "
                         "study with --study NEW_NAME")
    return stored


def study_threads(device: torch.device, stored: str | int | None, requested: int | None, workers: int,
                  name: str) -> int | None:
    """The CPU thread count to time a study with: set when the study is created (--threads, else
    default_threads() shared among the local workers) and kept by every resume and worker, because
    the ratios of bf16 and int8 to fp32 change with the thread count."""
    if device.type != "cpu":
        return requested
    if stored is None:
        return requested or max(1, default_threads() // workers)
    if requested is not None and requested != int(stored):
        raise StoreError(f"study {name!r} was timed with {threads_text(stored)} on the CPU, and latency ratios "
                         f"change with the thread count; drop --threads {requested} (a resume keeps the study's), "
                         "or start a new study with --study NEW_NAME")
    return int(stored)


def check_machine(info: StudyInfo, kind: dict[str, str] | None, name: str) -> None:
    """Refuse to time a study on another kind of machine than the one it is timed on: its latencies
    are ratios to fp32 on that kind, and another CPU model, ISA (ONEDNN_MAX_CPU_ISA,
    ATEN_CPU_CAPABILITY), GPU or torch gives other ratios. A study from before the kind was recorded
    is accepted (and gets this one)."""
    if kind is None or info.machine_kind is None or info.machine_kind == kind:
        return
    there, here = schema.machine_texts(info.machine_kind, kind)
    raise StoreError(f"study {name!r} is timed on {there}, and this machine is {here}: latency ratios to fp32 "
                     "change with the machine kind, so its trials would not compare; run it on a machine of the "
                     f"study's kind, or start a new study with --study NEW_NAME (this one is {name!r})")


def check_resume(info: StudyInfo, fingerprint: str, space: SearchSpace, device: torch.device,
                 max_drop: float | None, name: str, freed_memory_kept: bool, inputs: str | None = None,
                 machine_kind: dict[str, str] | None = None) -> None:
    way_out = f"start a new study with --study NEW_NAME (this one is {name!r})"
    if info.model_fingerprint != fingerprint:
        raise StoreError(f"study {name!r} was made for a different model ({info.model_class}, "
                         f"{info.model_path}); the model's structure changed; {way_out}")
    if info.inputs is not None and inputs is not None and info.inputs != inputs:
        raise StoreError(f"study {name!r} was timed on example_inputs() {info.inputs}, and they are now {inputs}: "
                         f"its latencies are ratios to the fp32 latency at those inputs; restore them, or {way_out}")
    if info.space_fingerprint != space.fingerprint():
        stored = info.space.get("name")
        if stored != space.name:
            raise StoreError(f"study {name!r} was made with search space {stored!r} and this run's space "
                             f"{space.name!r} differs; {way_out}")
        raise StoreError(f"study {name!r} was made with another version of search space {stored!r} (formats then: "
                         f"{', '.join(info.space.get('dtypes', []))}; now: {', '.join(space.dtypes)}; or its "
                         f"rules changed); {way_out}")
    if info.device_type != device.type:
        raise StoreError(f"study {name!r} was measured on {info.device_type}, not {device.type}; {way_out}")
    check_machine(info, machine_kind, name)
    kept = info.cpu_freed_memory_kept
    if device.type == "cpu" and kept is not None and kept != freed_memory_kept:
        was, flag = ("kept", "drop --malloc-defaults") if kept else ("returned", "add --malloc-defaults")
        raise StoreError(f"study {name!r} was timed with the CPU allocator's freed memory {was}, which changes "
                         f"latencies; {flag} to match it, or {way_out}")
    if max_drop is not None and abs(max_drop - info.max_drop) > 1e-15:
        raise StoreError(f"study {name!r} uses --max-drop {info.max_drop}, not {max_drop}; "
                         f"`autoprec front --max-drop` filters an existing study, or {way_out}")


def check_choices(study: optuna.Study, choices: dict[str, tuple[str, ...]], name: str) -> None:
    """Refuse a resume whose per-layer formats differ from the ones the study's trials were drawn from
    (autoprec's rules for which layer may take which format changed since it was created): Optuna cannot
    resume a categorical parameter over other values."""
    for trial in study.get_trials(deepcopy=False):
        stored = {key[len(schema.LAYER_PARAM):]: tuple(d.choices) for key, d in trial.distributions.items()
                  if key.startswith(schema.LAYER_PARAM) and hasattr(d, "choices")}
        if not stored:
            continue
        now = {n: tuple(o) for n, o in choices.items()}
        changed = sorted(n for n in set(stored) | set(now) if stored.get(n) != now.get(n))
        if changed:
            first = changed[0]
            raise StoreError(f"study {name!r} was made when layer {first!r} could take "
                             f"{', '.join(stored.get(first, ())) or 'no format'}; this autoprec offers it "
                             f"{', '.join(now.get(first, ())) or 'no format'} ({len(changed)} layers differ: the "
                             "rules for which layer takes which format changed); start a new study with "
                             f"--study NEW_NAME (this one is {name!r})")
        return


def _ready_info(storage: RDBStorage, name: str) -> StudyInfo | None:
    if name not in study_names(storage):
        return None
    study = optuna.load_study(study_name=name, storage=storage)
    return schema.read_info(study) if schema.is_autoprec_study(study) else None


class _Opener:
    """The steps of open_study, sharing what they load."""

    def __init__(self, config: SearchConfig) -> None:
        self.config = config
        self.spec = load_spec(config.model)
        self.space = load_space(config.space)
        self.device = resolve_device(config.device)
        model = self.spec.new_model()
        self.fingerprint = model_fingerprint(model)
        self.inputs = describe_inputs(self.spec.example())
        self.choices = self.space.choices(model, self.device)
        if self.choices:
            self.space.check_device(model, self.device)
        if config.runtime == "openvino":
            if self.space.trains:
                raise AutoprecError(f"--runtime openvino: space {self.space.name!r} enables training, which fine-tunes "
                                    "in torch; use a space without 'training', or --runtime eager")
            self.space, self.choices = openvino_space(self.space, self.choices)
        if not self.choices:
            if is_searchable(model):  # the model is one layer: formats go to named sub-layers only
                raise AutoprecError(f"{self.spec.path}: build_model() returns a bare {type(model).__name__}, which has "
                                    "no named layer to give a format to; return it wrapped, e.g. "
                                    "torch.nn.Sequential(layer)")
            raise AutoprecError(f"{self.spec.path}: no searchable layer under space {self.space.name!r} "
                                f"({self.space.source}); check its 'layers' and 'rules'")
        if self.space.trains and not self.spec.can_train:
            raise AutoprecError(f"{self.spec.path}: space {self.space.name!r} enables training, but model.py lacks "
                                "train_batches() and loss(outputs, targets); define both, or use a space without "
                                "'training'")
        if self.space.trains and self.spec.evaluate is None:
            raise AutoprecError(f"{self.spec.path}: evaluate(model, device) is missing; training mode needs a task "
                                "score (fidelity to the un-tuned model is no score after fine-tuning)")
        self.study_name = config.study or default_study_name(config.model)
        self.storage_url = storage_url(config.storage)
        file = sqlite_file(self.storage_url)
        self.new_file = file if file is not None and not file.exists() else None
        self.storage = open_storage(self.storage_url)
        self.ledger: Ledger = self.storage.ledger  # type: ignore[attr-defined]
        self.machine_kind = format_probe.machine_kind(self.device)

    def open(self) -> OpenedStudy:
        config = self.config
        evaluator = None
        info = _ready_info(self.storage, self.study_name)
        if info is None:
            threads = study_threads(self.device, None, config.threads, config.workers, self.study_name)
            runtime = study_runtime(self.device, None, config.runtime, self.study_name)
            info, evaluator = self._create_or_wait(threads, runtime)
        if evaluator is None:
            if info.runtime == "openvino" and config.runtime is None:  # a resume keeps the study's runtime
                self.space, self.choices = openvino_space(self.space, self.choices)
            self._keep_study_formats(info)
            check_resume(info, self.fingerprint, self.space, self.device, config.max_drop, self.study_name,
                         prepare_allocator(config.timing.keep_freed_memory), self.inputs, self.machine_kind)
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
            check_choices(study, self.choices, self.study_name)
            if not config.prune and self._pruning(info) is not None:
                # the pruned choices are the study's: a resume cannot widen them (workers would disagree)
                raise StoreError(f"study {self.study_name!r} was created with format pruning, and a study keeps "
                                 "the choices it was created with; drop --no-prune (a resume keeps the study's), "
                                 "or start a new study with --study NEW_NAME --no-prune")
            threads = study_threads(self.device, info.environment.get("threads"), config.threads,
                                    config.workers, self.study_name)
            runtime = study_runtime(self.device, info.runtime, config.runtime, self.study_name)
            evaluator = self._evaluator(threads, runtime, info.reference.latency_ms)
            if info.machine_kind is None:  # a study from before the kind was recorded: its kind from now on
                info.machine_kind = self.machine_kind
                schema.write_info(study, info)
        if self.device.type == "cpu" and threads and threads * config.workers > usable_cores():
            print(f"autoprec: {config.workers} x {threads_text(threads)} (study {self.study_name!r}'s) "
                  f"oversubscribe this machine's {usable_cores()} cores, which slows and blurs every timing; "
                  "use fewer --workers, or a new study with fewer --threads", file=sys.stderr)
        return OpenedStudy(config=config, spec=self.spec, space=self.space, device=self.device, choices=self.choices,
                           study_name=self.study_name, storage_url=self.storage_url, storage=self.storage,
                           evaluator=evaluator, info=info, threads=threads, pruning=self._pruning(info),
                           machine_kind=self.machine_kind)

    def _keep_study_formats(self, info: StudyInfo) -> None:
        """Resume a study over the formats it was created with when its space has gained formats since
        (a shipped space such as `cpu` when autoprec adds a format to it, or a space file that names no
        dtypes, which means every format): the same space otherwise, so its trials still compare, and
        Optuna cannot resume a layer's categorical choice over more values. The new formats take a new study."""
        stored = (info.space or {}).get("dtypes")
        if info.space_fingerprint == self.space.fingerprint() or not isinstance(stored, list):
            return
        if not set(stored) < set(self.space.dtypes):
            return
        narrowed = dataclasses.replace(self.space, dtypes=tuple(stored))
        if narrowed.fingerprint() != info.space_fingerprint:
            return  # the space changed otherwise too: check_resume refuses it
        added = [d for d in self.space.dtypes if d not in stored]
        print(f"autoprec: study {self.study_name!r} searches the formats it was created with ({', '.join(stored)}); "
              f"{', '.join(added)}, added to space {self.space.name!r} since, takes a new study (--study NEW_NAME)",
              file=sys.stderr)
        self.space = narrowed
        self.choices = self.space.choices(self.spec.new_model(), self.device)

    def _pruning(self, info: StudyInfo) -> format_probe.Pruning | None:
        """What the study leaves out of per-layer search: fixed when it was created (its probe and
        its --no-prune), so every resume and worker searches the same choices."""
        if not info.prune or not isinstance(info.probe, dict):
            return None
        kinds = {layer.name: format_probe.layer_kind(layer.cls) for layer in self.space.layers(self.spec.new_model())}
        pruning = format_probe.prune(self.choices, kinds, self.space.default_dtypes, format_probe.FormatProbe.from_json(info.probe))
        return None if pruning.announcement is None else pruning

    def _evaluator(self, threads: int | None, runtime: str, reference_latency_ms: float | None = None) -> Evaluator:
        cache = inductor_cache_dir(self.storage_url)
        if runtime != "eager" and cache is not None:
            runtimes.use_cache_dir(cache)
        if self.device.type == "cpu":  # process-wide, once, before the fp32 reference is measured
            configure_cpu(threads, self.config.timing.keep_freed_memory)
        return Evaluator(self.spec, self.device, timing=self.config.timing,
                         reference_latency_ms=reference_latency_ms, runtime=runtime)

    def _create_or_wait(self, threads: int | None, runtime: str) -> tuple[StudyInfo, Evaluator | None]:
        """The first worker measures the fp32 reference and creates the study; the others wait for it."""
        while True:
            if self.ledger.claim(self.study_name, "reference", stale_s=CLAIM_STALE_S):
                try:
                    evaluator = self._evaluator(threads, runtime)
                    # Created only once the reference is measured: a broken spec leaves no study behind.
                    study = optuna.create_study(study_name=self.study_name, storage=self.storage,
                                                directions=list(DIRECTIONS), load_if_exists=True)
                    info = self._initialise(study, evaluator)
                except BaseException:
                    self.ledger.drop_claim(self.study_name, "reference")
                    raise
                self.ledger.finish_claim(self.study_name, "reference")
                return info, evaluator
            waited = time.monotonic()
            while time.monotonic() - waited < CLAIM_STALE_S:
                info = _ready_info(self.storage, self.study_name)
                if info is not None:
                    return info, None
                time.sleep(1.0)

    def _initialise(self, study: optuna.Study, evaluator: Evaluator) -> StudyInfo:
        model = evaluator.model
        max_drop = self.config.max_drop
        info = StudyInfo(
            model_path=str(self.spec.path.resolve()), model_class=type(model).__name__,
            model_fingerprint=self.fingerprint, inputs=self.inputs, space=self.space.to_json(),
            space_fingerprint=self.space.fingerprint(), device_type=self.device.type,
            environment=environment(self.device),
            cpu_freed_memory_kept=prepare_allocator(self.config.timing.keep_freed_memory), runtime=evaluator.runtime,
            max_drop=DEFAULT_MAX_DROP if max_drop is None else max_drop,
            reference=Reference(score=evaluator.reference_score, latency_ms=evaluator.reference_latency_ms,
                                memory_bytes=module_storage_bytes(model)),
            layers=list(self.choices), training=self.space.trains, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            machine_kind=self.machine_kind)
        # the format probe runs in the study's thread count, set by the Evaluator; cached per machine
        # in the study's runtime: a compiled study's probe times compiled kernels (torchao's int8 was 16x
        # slower than fp32 eager on an H200, and 0.74x compiled)
        rest = "fp32"  # the default of the uniform int8 policy: what runs everything that is not a layer
        if evaluator.runtime == "openvino":  # the probe times torch's kernels, which this runtime does not run
            info.probe, info.prune = None, False
            order = [d for d in ("int8", "bf16") if d in self.space.dtypes]
            if openvino_runtime.bf16_runs():  # as OpenVINO runs NNCF's whole-graph int8 by default
                rest = "bf16"
        else:
            found, _ = format_probe.cached_probe(schema.stored_probes(self.storage), self.space.dtypes, self.device,
                                                 evaluator.runtime)
            info.probe, info.prune = found.to_json(), self.config.prune
            order = found.order(d for d in DTYPES if d != "fp32")
        study.set_metric_names(list(OBJECTIVES))
        # fp32, then the others fastest first: a slow format's uniform policy then meets a front that
        # settles its timing in a few rounds
        for fmt in ["fp32", *order]:
            params = schema.uniform_params(self.choices, self.space, fmt, default=rest)
            if params is not None:
                schema.enqueue(study, params, Origin.uniform(fmt))
        schema.write_info(study, info)  # last: its presence means the study is ready
        return info


def open_study(config: SearchConfig) -> OpenedStudy:
    check_config(config)
    opener = _Opener(config)
    try:
        return opener.open()
    except BaseException:
        if opener.new_file is not None:
            discard_if_unused(opener.storage, opener.new_file)
        raise
