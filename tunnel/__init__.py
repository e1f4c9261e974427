"""pytunnel: a TLS-wrapping TCP tunnel, drop-in compatible with stunnel."""

__version__ = "0.1.0"
STUNNEL_COMPAT_VERSION = "5.75"
