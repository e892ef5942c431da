"""The guided search: per-layer sensitivity profile, cost model, drop model and planner, and the
part of their state kept on the study."""
