"""The commands and their Hydra glue: `featbench` (`featbench`), the end-of-sweep report
(`callbacks`), folder names (`naming`), `featbench-wandb-sync` (`wandb_sync`) and the
offline judge's calibration (`calibrate_judge`). `featbench-report` is `bench.report`."""
