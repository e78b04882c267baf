"""Clusters: a broker and units of workers started by a launcher (local, SSH, Slurm)."""
from .base import Cluster, LaunchWarning

__all__ = ["Cluster", "LaunchWarning"]
