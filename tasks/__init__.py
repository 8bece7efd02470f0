"""Evaluation tasks: one file per task; the contract is in `tasks.base`."""
