"""Method plugins: one file per method; the contract is in `featbench.methods.base`."""
