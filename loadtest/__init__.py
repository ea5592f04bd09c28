"""Load generation for xksproxy (measurements, never tests)."""
