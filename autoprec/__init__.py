"""autoprec: search per-layer numeric formats for a PyTorch model, apply the chosen policy.

`import autoprec` loads torch only; the search (Optuna, SQLAlchemy, pandas) lives in submodules.
"""

from autoprec.errors import AutoprecError, PolicyError, SpecError, UnsupportedFormat
from autoprec.policy import Policy, TrainingSettings, apply_policy, load_policy, model_fingerprint
from autoprec.training import make_optimizer, make_scaler, prepare_training, training_context

__version__ = "0.1.0"

__all__ = [
    "AutoprecError",
    "Policy",
    "PolicyError",
    "SpecError",
    "TrainingSettings",
    "UnsupportedFormat",
    "apply_policy",
    "load_policy",
    "make_optimizer",
    "make_scaler",
    "model_fingerprint",
    "prepare_training",
    "training_context",
]
