"""crashlab: a crash harness for SQLite in processes, containers and virtual machines."""

__version__ = "0.1.0"
