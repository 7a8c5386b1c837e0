"""The package version, stamped into every artifact and report."""

__version__ = "0.1.0"
