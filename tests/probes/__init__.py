"""Standalone probes of a broker's behaviour the tests work around (not collected by pytest)."""
