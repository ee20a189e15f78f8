"""The command-line pipelines (``python -m pipelines.<name>``). ``e2r`` is imported first, before any
pipeline loads torch: it sets the OpenMP wait policy (``e2r/__init__.py``)."""
import e2r  # noqa: F401
