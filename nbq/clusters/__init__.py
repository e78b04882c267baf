"""Clusters: a broker and units of workers started by a launcher (local, SSH, Slurm)."""
from .base import Cluster, LaunchWarning
from .ssh import SSHCluster

__all__ = ["Cluster", "LaunchWarning", "SSHCluster"]
