"""Steering's mechanics, in the order the task runs them: `settings` (the protocol table
and checks), `calibrate` (alpha for a KL target, with `kl`), `generate` (batched sampling
with a KV cache over `decode`'s lean decoder and `sampling`), `units` (a unit through the
stages, and judging its samples) and `scores` (held-out and best-KL scores from rows).
The protocol itself is `featbench.tasks.steering`."""
