"""Vendors' private Storage SOP Classes (``[receiver] extra_storage_sop_classes``): accepted at
negotiation and served by the Storage service like standard ones; a bad entry fails at start-up."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from diana.config import PRIVATE_STORAGE_SOP_CLASSES, ConfigError, _is_conformant_uid, load_config
from diana.producers.scp import add_storage_contexts
from diana.schemas.uid import is_conformant_uid
from tests.support.dicomgen import make_instance

SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"


def test_the_default_list_holds_the_well_known_private_classes():
    cfg = load_config(None, environ={})
    assert cfg.receiver.extra_storage_sop_classes == PRIVATE_STORAGE_SOP_CLASSES
    assert SIEMENS_CSA_NON_IMAGE in PRIVATE_STORAGE_SOP_CLASSES
    assert (
        load_config(None, environ={"DIANA_RECEIVER_EXTRA_STORAGE_SOP_CLASSES": ""}).receiver.extra_storage_sop_classes
        == ()
    )


@pytest.mark.parametrize("entry", ["1.2.3/4", "siemens", "1..2", "1." + "2" * 64])
def test_an_entry_that_is_not_a_uid_fails_at_start_up_saying_so(tmp_path: Path, entry: str):
    f = tmp_path / "c.toml"
    f.write_text(f'[receiver]\nextra_storage_sop_classes = ["1.2.3", "{entry}"]\n')
    with pytest.raises(ConfigError, match="extra_storage_sop_classes: .* is not a UID"):
        load_config(f, environ={})


def test_a_uid_of_another_service_is_refused():
    with pytest.raises(ValueError, match="QueryRetrieveServiceClass SOP Class, not a storage one"):
        add_storage_contexts(AE(), ("1.2.840.10008.5.1.4.1.2.2.1",))  # Study Root C-FIND


def test_a_private_class_is_negotiated_and_its_c_store_reaches_the_handler():
    received: list[tuple[str, str]] = []

    def handler(event: evt.Event) -> int:
        received.append((str(event.context.abstract_syntax), str(event.dataset.SOPClassUID)))
        return 0x0000

    server_ae = AE(ae_title="DIANA")
    add_storage_contexts(server_ae, PRIVATE_STORAGE_SOP_CLASSES)
    assert SIEMENS_CSA_NON_IMAGE in {cx.abstract_syntax for cx in server_ae.supported_contexts}
    server = server_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)])
    try:
        ds = make_instance(generate_uid(), generate_uid(), 1, patient_id="P9", study_date="20240315")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SIEMENS_CSA_NON_IMAGE
        del ds.PixelData
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        client = AE(ae_title="MODALITY")
        client.add_requested_context(SIEMENS_CSA_NON_IMAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="DIANA")
        assert assoc.is_established and assoc.accepted_contexts[0].abstract_syntax == SIEMENS_CSA_NON_IMAGE
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert status.Status == 0x0000
    assert received == [(SIEMENS_CSA_NON_IMAGE, SIEMENS_CSA_NON_IMAGE)]


def test_without_it_the_private_class_is_refused_at_negotiation():
    server_ae = AE(ae_title="DIANA")
    add_storage_contexts(server_ae, ())
    server = server_ae.start_server(("127.0.0.1", 0), block=False)
    try:
        client = AE(ae_title="MODALITY")
        client.add_requested_context("1.3.12.2.1107.5.99.3.11", ExplicitVRLittleEndian)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="DIANA")
        try:
            assert not assoc.accepted_contexts
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        server.shutdown()


@pytest.mark.parametrize("entry", ["1.2.03.4", "01.2.3", "1.2.840.10008.5.1.4.1.1.0002"])
def test_an_entry_with_a_leading_zero_fails_at_config_load_not_at_start_up(tmp_path: Path, entry: str):
    """It passed the digits-and-dots check, then pydicom's stricter one (the class registered at start-up)."""
    f = tmp_path / "c.toml"
    f.write_text(f'[receiver]\nextra_storage_sop_classes = ["1.2.3", "{entry}"]\n')
    with pytest.raises(ConfigError, match=rf"extra_storage_sop_classes: '{entry}' has a component with a leading zero"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match="leading zero"):
        load_config(None, environ={"DIANA_RECEIVER_EXTRA_STORAGE_SOP_CLASSES": f"1.2.3,{entry}"})
    assert load_config(None, environ={"DIANA_RECEIVER_EXTRA_STORAGE_SOP_CLASSES": "1.2.0.3,0.4"})


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom's, on the invalid ones
@pytest.mark.parametrize(
    "value",
    ["1.2.3", "0", "0.1", "1.0.2", "1.2.03", "01", "00", "1..2", "", "1.", "a.b", "1." + "2" * 63, "1." + "2" * 62],
)
def test_the_config_check_is_schemas_is_conformant_uid_and_pydicoms(value: str):
    """config may not import diana.schemas (import contracts): its copy of the rule agrees with both."""
    assert _is_conformant_uid(value) == is_conformant_uid(value) == UID(value).is_valid, value
