"""UCUM units of dose reports, converted to the one canonical set of diana-star's dose records.

Vendors spell the same unit differently ("mGy.cm", "mGycm", "Gym2", "dGy.cm2", "uA.s"), so a unit
is compared with its separators removed. A value whose unit does not belong to the quantity asked
for is refused (None), never guessed.
"""

from __future__ import annotations

__all__ = ["CANONICAL", "UnitError", "convert", "factor_to_canonical"]


class UnitError(ValueError):
    """The unit is unknown or belongs to another quantity."""


# quantity -> (canonical unit, {unit spelled without separators: factor to canonical})
CANONICAL: dict[str, tuple[str, dict[str, float]]] = {
    "dose": ("mGy", {"Gy": 1e3, "dGy": 1e2, "cGy": 10.0, "mGy": 1.0, "uGy": 1e-3}),
    "dlp": ("mGycm", {"mGycm": 1.0, "Gycm": 1e3, "mGymm": 0.1, "uGycm": 1e-3, "cGycm": 10.0}),
    "dap": (
        "Gym2",
        {
            "Gym2": 1.0,
            "mGym2": 1e-3,
            "uGym2": 1e-6,
            "Gycm2": 1e-4,
            "dGycm2": 1e-5,
            "cGycm2": 1e-6,
            "mGycm2": 1e-7,
            "uGycm2": 1e-10,
        },
    ),
    "length": ("mm", {"mm": 1.0, "cm": 10.0, "m": 1e3, "um": 1e-3}),
    "time": ("s", {"s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0, "h": 3600.0}),
    "current": ("mA", {"mA": 1.0, "A": 1e3, "uA": 1e-3}),
    "charge": ("mAs", {"mAs": 1.0, "As": 1e3, "uAs": 1e-3}),
    "activity": ("MBq", {"MBq": 1.0, "Bq": 1e-6, "kBq": 1e-3, "GBq": 1e3, "mCi": 37.0, "uCi": 0.037}),
    "voltage": ("kV", {"kV": 1.0, "V": 1e-3}),
    "force": ("N", {"N": 1.0, "daN": 10.0}),
    # Counts, ratios and indices: UCUM "1" or an annotation such as {ratio} or {X-Ray sources}.
    "ratio": ("1", {"1": 1.0, "": 1.0}),
}


def _spelling(unit: str) -> str:
    unit = unit.strip().replace("µ", "u").replace("μ", "u")
    for separator in (".", "·", "*", " "):
        unit = unit.replace(separator, "")
    return unit


def factor_to_canonical(unit: str, quantity: str) -> float:
    """The factor that turns a value in ``unit`` into ``quantity``'s canonical unit."""
    _, factors = CANONICAL[quantity]
    spelled = _spelling(unit)
    if spelled in factors:
        return factors[spelled]
    if quantity == "ratio" and not any(spelled in other for _, other in CANONICAL.values()):
        # Counts are "1" or an annotation, "{X-Ray sources}"; some reports drop the braces.
        return 1.0
    raise UnitError(f"unit {unit!r} is not a unit of {quantity}")


def convert(value: float, unit: str, quantity: str) -> float:
    return value * factor_to_canonical(unit, quantity)
