"""nbq's version, which workers compare with their client's (clusters' ``--versions``)."""
__version__ = "0.1.0"
