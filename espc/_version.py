"""The package version, in a module of its own: the planner records it in every policy and
artifact without importing the public API (`espc/__init__.py`) above it."""

__version__ = "0.1.0"
