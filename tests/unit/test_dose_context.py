"""The study context of a dose record: a size or weight that is not a positive finite number is absent."""

from __future__ import annotations

import warnings

from pydicom import Dataset

from diana.stream_apps.dose.context import study_context


def _weight(text: str) -> float | None:
    ds = Dataset()
    with warnings.catch_warnings():  # pydicom warns of the values this test feeds it on purpose
        warnings.simplefilter("ignore")
        ds.add_new(0x00101030, "DS", text)  # Patient's Weight
    return study_context(ds)["patient_weight_kg"]


def test_a_weight_that_is_not_a_positive_finite_number_is_not_known() -> None:
    # "inf" reached the dose document, where the sink's JSON writes it as null: the field was lost
    # silently instead of being absent as for NaN.
    assert [_weight(text) for text in ("inf", "-inf", "NaN", "0", "-3", "")] == [None] * 6
    assert _weight("72.5") == 72.5
