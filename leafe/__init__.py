"""leafe: train LLM agents with LEAFE (reflect on feedback, roll back, distil the corrections)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("leafe")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
