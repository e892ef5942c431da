"""The study store: Optuna's RDB storage, the schema of what autoprec keeps in it, the worker
tables beside it, and the recovery of stale or interrupted trials."""
