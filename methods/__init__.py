"""Method plugins: one file per method; the contract is in `methods.base`."""
