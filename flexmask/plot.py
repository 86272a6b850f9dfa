"""Visualisation (placeholder; see the visualisation issue)."""
