"""nanod: the Nano management daemon (API + reconciler) and its command line."""

__version__ = "0.1.0"
