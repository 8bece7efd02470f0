"""Plumbing every stage uses, nothing featbench-specific: atomic files and cache locks
(`storage`), secrets (`secrets`), hook names (`hooks`), dtypes (`dtypes`), the device
(`device`) and stage timing (`stages`)."""
