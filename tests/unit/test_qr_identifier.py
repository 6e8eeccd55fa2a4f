"""Unit: C-FIND identifiers checked against the model and level, and their matching as OpenSearch clauses."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from diana.access.qr.identifier import IdentifierError, parse_identifier
from diana.access.qr.opensearch_query import query_for
from diana.config import ConfigError, load_config, parse_destinations


def identifier(**keys: object) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_study_level_keys_become_clauses():
    query = parse_identifier(
        identifier(
            QueryRetrieveLevel="STUDY",
            PatientName="doe*",
            PatientID="P1",
            StudyDate="20210101-20210331",
            StudyTime="1015",
            StudyInstanceUID=["1.2.3", "1.2.4"],
            ModalitiesInStudy="",
            AccessionNumber="*",
        ),
        "STUDY",
    )
    clauses = query_for(query)["bool"]["filter"]
    assert {"wildcard": {"patient_name.keyword": {"value": "doe*", "case_insensitive": True}}} in clauses
    assert {"term": {"patient_id": "P1"}} in clauses
    assert {"range": {"study_date": {"gte": "2021-01-01", "lte": "2021-03-31"}}} in clauses
    assert {"range": {"study_time": {"gte": "10:15:00", "lte": "10:15:59.999999"}}} in clauses
    assert {"terms": {"study_instance_uid": ["1.2.3", "1.2.4"]}} in clauses
    assert len(clauses) == 5  # empty and "*" keys match universally
    assert len(query.return_tags) == 7  # every key but QueryRetrieveLevel


def test_referring_physician_name_is_matched_as_the_patient_name_is():
    def clauses(**keys: object) -> list[dict]:
        query = parse_identifier(identifier(QueryRetrieveLevel="STUDY", **keys), "STUDY")
        return query_for(query)["bool"]["filter"]

    for value in ("smith*", "Smith^Anna", "Sm?th\\Doe*"):
        referring = clauses(ReferringPhysicianName=value)
        patient = clauses(PatientName=value)
        # the same clause on its own field: wildcards, lists and case rules of a person name
        assert referring == [_on_field(c, "patient_name.keyword", "referring_physician_name.keyword") for c in patient]
    assert clauses(ReferringPhysicianName="smith*") == [
        {"wildcard": {"referring_physician_name.keyword": {"value": "smith*", "case_insensitive": True}}}
    ]
    # empty: a return key only, matching every study
    query = parse_identifier(identifier(QueryRetrieveLevel="STUDY", ReferringPhysicianName=""), "STUDY")
    assert query.matchers == [] and query.return_tags == [0x00080090]


def test_referring_physician_name_is_a_study_key_not_a_patient_one():
    with pytest.raises(IdentifierError, match="ReferringPhysicianName is a STUDY key") as caught:
        parse_identifier(identifier(QueryRetrieveLevel="PATIENT", ReferringPhysicianName="smith*"), "PATIENT")
    assert caught.value.status == 0xA900


def _on_field(clause: object, old: str, new: str) -> object:
    """``clause`` with every key ``old`` renamed ``new``."""
    if isinstance(clause, dict):
        return {(new if k == old else k): _on_field(v, old, new) for k, v in clause.items()}
    if isinstance(clause, list):
        return [_on_field(c, old, new) for c in clause]
    return clause


def test_open_ranges_and_universal_query():
    query = parse_identifier(identifier(QueryRetrieveLevel="STUDY", StudyDate="-20200101"), "STUDY")
    assert query_for(query) == {"bool": {"filter": [{"range": {"study_date": {"lte": "2020-01-01"}}}]}}
    assert query_for(parse_identifier(identifier(QueryRetrieveLevel="STUDY"), "STUDY")) == {"match_all": {}}


@pytest.mark.parametrize(
    "keys,model,status,names",
    [
        ({"PatientID": "X"}, "STUDY", 0xA900, "QueryRetrieveLevel"),
        ({"QueryRetrieveLevel": "PATIENT"}, "STUDY", 0xA900, "Study Root"),
        ({"QueryRetrieveLevel": "SERIES"}, "STUDY", 0xA900, "StudyInstanceUID"),
        ({"QueryRetrieveLevel": "STUDY"}, "PATIENT", 0xA900, "PatientID"),
        ({"QueryRetrieveLevel": "STUDY", "SOPInstanceUID": "1.2"}, "STUDY", 0xA900, "SOPInstanceUID"),
        ({"QueryRetrieveLevel": "STUDY", "NumberOfStudyRelatedInstances": "3"}, "STUDY", 0xA900, "return key"),
        ({"QueryRetrieveLevel": "STUDY", "StudyDate": "2021"}, "STUDY", 0xC000, "StudyDate"),
        ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20210230"}, "STUDY", 0xC000, "calendar"),
        ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20210301-20210101"}, "STUDY", 0xC000, "ends before"),
        ({"QueryRetrieveLevel": "STUDY", "StudyTime": "2500"}, "STUDY", 0xC000, "StudyTime"),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}, "STUDY", 0xC000, "not a UID"),
    ],
)
def test_bad_identifiers_name_status_and_attribute(keys, model, status, names):
    with pytest.raises(IdentifierError, match=names) as caught:
        parse_identifier(identifier(**keys), model)
    assert caught.value.status == status


def test_retrieve_needs_the_unique_key_of_its_level():
    with pytest.raises(IdentifierError, match="StudyInstanceUID") as caught:
        parse_identifier(identifier(QueryRetrieveLevel="STUDY", PatientID="P"), "STUDY", retrieve=True)
    assert caught.value.status == 0xA900
    query = parse_identifier(identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.3"), "STUDY", retrieve=True)
    assert query.unique_values("STUDY") == ("1.2.3",)


def test_move_destinations_are_parsed_and_checked():
    parsed = parse_destinations(("VIEWER=10.0.0.5:11112", "PACS=pacs.example.org:2762:tls"))
    assert (parsed["VIEWER"].host, parsed["VIEWER"].port, parsed["VIEWER"].tls) == ("10.0.0.5", 11112, False)
    assert parsed["PACS"].tls and parsed["PACS"].port == 2762
    with pytest.raises(ConfigError, match="AE=host:port"):
        load_config(None, environ={"DIANA_QUERY_RETRIEVE_DESTINATIONS": "VIEWER@10.0.0.5"})


def test_undecodable_number_is_unable_to_process():
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2")
    ds[0x00200011] = RawDataElement(Tag(0x00200011), "IS", 4, b"one ", 0, False, True)  # as it came off the wire
    with pytest.raises(IdentifierError, match="SeriesNumber") as caught:
        parse_identifier(ds, "STUDY")
    assert caught.value.status == 0xC000


def test_a_document_without_its_header_answers_the_referring_physician_name_from_its_field():
    from diana.access.qr.index_reader import FALLBACK_FIELDS, Match
    from diana.access.qr.response import build_response

    query = parse_identifier(identifier(QueryRetrieveLevel="STUDY", ReferringPhysicianName=""), "STUDY")
    document = {"study_instance_uid": "1.2.3", "referring_physician_name": "Smith^Anna"}  # no "dicom"
    assert str(build_response(query, Match(document, {}), "DIANA").ReferringPhysicianName) == "Smith^Anna"
    assert "referring_physician_name" in FALLBACK_FIELDS  # what the reader asks the index to send back
