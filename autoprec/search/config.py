"""What one search is asked to do: the settings of `autoprec search`, as a dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from autoprec.measure.timing import TimingSettings


@dataclass
class SearchConfig:
    model: str
    trials: int = 20
    timeout: float | None = None
    storage: str | None = None
    study: str | None = None
    space: str | None = None
    device: str | None = None
    max_drop: float | None = None
    seed: int = 0
    threads: int | None = None  # CPU threads; None: the study's, or for a new study default_threads() / workers
    workers: int = 1  # local worker processes that will share this machine's cores
    runtime: str | None = None  # eager or compiled (autoprec.measure.runtime); None: the study's, or the device's default
    devices: tuple[str, ...] | None = None  # one worker per device (cuda:0,cuda:1), round robin
    strategy: str = "guided"  # guided (profile + sequential proposals, then TPE), tpe, nsga2, random
    retime_front: bool = True
    prune: bool = True  # leave formats the probe finds far slower than fp32 out of per-layer search
    timing: TimingSettings = field(default_factory=TimingSettings)
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SearchConfig":
        devices = data.get("devices")
        return cls(**{**data, "timing": TimingSettings(**data["timing"]),
                      "devices": tuple(devices) if devices else None})
