"""Dose alerts that reach people once: routing, delivery by e-mail and webhook, acknowledgment (docs/DOSE.md)."""
