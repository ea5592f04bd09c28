"""HTTP edge: routing, SigV4, error rendering, the audit line."""
