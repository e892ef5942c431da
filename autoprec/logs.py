"""What the commands silence in the libraries autoprec uses (never done at import: a library user
keeps their own logging and warning filters)."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    """Silence what libraries print that a user should not read as trouble (set by the commands,
    never at import: a library user keeps their own warning filters)."""
    # torchao (imported by transformers when installed) registers Enums with torch's pytree, and
    # torch 2.14 logs a deprecation warning per Enum at import: noise for a user, not an error
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # torch.compile on a CPU-only machine with a CUDA toolkit path logs "No CUDA runtime is found": not ours
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # torchao 0.17 warns that its int8 tensor types are deprecated each time one is made, at every
    # int8 forward on CUDA: hundreds of lines in a search's output (seen on an H200)
    warnings.filterwarnings("ignore", message=r"Deprecation: .* is deprecated and will be removed in a future "
                            r"release of torchao")
    # Optuna 4 marks the heartbeat, constraints and metric names "experimental"; autoprec relies on them
    warnings.filterwarnings("ignore", message=r".* is experimental \(supported from v")
    # inductor's CPU codegen notes a kernel that mixes bf16 and fp16 (a policy's boundary casts do): it
    # then keeps that kernel in fp32, which is the compiled runtime's honest cost, not trouble (dozens of
    # these lines in one compiled search)
    warnings.filterwarnings("ignore", message=r"bf16 and fp16 are mixed in the scheduler node")
    # Optuna's RDB storage logs a failed read with its SQL and parameters before it retries another way;
    # when the store is failing, the command ends with one line on it (autoprec.store.storage.store_fault)
    logging.getLogger("optuna.storages._rdb.storage").addFilter(_no_sql_fallback_notes)


def _no_sql_fallback_notes(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Caught an error from sqlalchemy")
