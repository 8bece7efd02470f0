"""One job, from config to metrics.parquet: `run` (the stages), `checks` (before, at the
start of and after the work), `config` (the typed schema) and `tracking` (W&B, a side
channel)."""

from bench.job.run import rescue_dir, run_job

__all__ = ["rescue_dir", "run_job"]
