"""What tasks share: the task contract (`base`), checkpoints, descriptions of features,
sentences a judge writes (`sentences`), concept matching and detection statistics
(`detection`), and the steering mechanics (`steering/`). The tasks themselves are
plugins in `featbench.tasks`."""
