"""Measuring one candidate on this machine: machine facts, the timing protocol, the runtimes
(eager, compiled), the format probe, calibration, fine-tuning, and the `apply` re-measurement."""
