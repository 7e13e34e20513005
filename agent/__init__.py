"""Backup agents for containerized applications: the source agent and the sink agent."""

__version__ = "0.1.0"
