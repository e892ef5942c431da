"""autoprec: search per-layer numeric formats for a PyTorch model, apply the chosen policy.

`import autoprec` loads torch only; the search (Optuna, SQLAlchemy, pandas) lives in submodules.
"""

from autoprec.errors import AutoprecError, PolicyError, SpecError, UnsupportedFormat
from autoprec.policy import Policy, TrainingSettings, apply_policy, load_policy, model_fingerprint
from autoprec.training import make_optimizer, make_scaler, prepare_training, training_context

__version__ = "0.1.0"


def __getattr__(name: str):
    """`autoprec.run_search` and `autoprec.SearchConfig`, imported on first use: the search needs
    Optuna, SQLAlchemy and pandas, which applying a policy never does."""
    if name in ("run_search", "SearchConfig"):
        from autoprec.search import config, loop

        return loop.run_search if name == "run_search" else config.SearchConfig
    raise AttributeError(f"module 'autoprec' has no attribute {name!r}")


__all__ = [
    "AutoprecError",
    "Policy",
    "PolicyError",
    "SearchConfig",
    "SpecError",
    "TrainingSettings",
    "UnsupportedFormat",
    "apply_policy",
    "load_policy",
    "make_optimizer",
    "make_scaler",
    "model_fingerprint",
    "prepare_training",
    "run_search",
    "training_context",
]
