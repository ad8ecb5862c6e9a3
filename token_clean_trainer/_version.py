"""The package version, in a module of its own: modules inside the package read it without importing `__init__`."""

__version__ = "0.1.0.dev0"
