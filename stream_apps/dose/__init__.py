"""Radiation dose: extraction from dose reports and image headers, per-study records, alert rules."""
