"""Key lifecycle, run by the command line against the HSMs (never on the request path)."""
