"""Fitting: the method contract (`method`), what a fit produces (`features`), the job's
shared codes (`encodings`), top-activating contexts (`contexts`) and the checks a fit
must pass (`checks`)."""

from bench.fit.features import ArtifactError, Features
from bench.fit.method import GeneratorInfo, Method, NotResizable

__all__ = ["ArtifactError", "Features", "GeneratorInfo", "Method", "NotResizable"]
