"""Evaluation tasks: one file per task; the contract is in `featbench.tasks.base`."""
