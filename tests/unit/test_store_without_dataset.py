"""A C-STORE whose command says it has no data set (CommandDataSetType 0x0101): before, the handler
reached open(None), answered 0xC211 and logged a traceback; now 0xC210 "without a data set", cleanly.

Over a real association in this process (pynetdicom on both sides, the receiver's spill-to-file on)."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.dimse_primitives import C_STORE

from diana.producers import scp
from diana.producers.scp import STATUS, handle_store
from diana.producers.spill import SpillFile


class _NoIngest:
    def __init__(self) -> None:
        self.calls = 0

    def accept_file(self, *_args: Any, **_kwargs: Any) -> None:
        self.calls += 1
        raise AssertionError("a C-STORE without a data set reached ingest")


def test_a_c_store_without_a_data_set_is_cannot_understand_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    monkeypatch.setattr(_dimse_messages, "NamedTemporaryFile", SpillFile)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    logged: list[tuple[str, dict]] = []
    monkeypatch.setattr(scp.log, "warning", lambda event, **kw: logged.append((event, kw)))
    monkeypatch.setattr(scp.log, "exception", lambda event, **kw: logged.append(("exception:" + event, kw)))
    ingest = _NoIngest()

    server_ae = AE(ae_title="DIANA")
    server_ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = server_ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store, [ingest])]
    )
    try:
        port = server.server_address[1]
        client = AE(ae_title="EMPTYSENDER")
        client.dimse_timeout = 20
        client.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = client.associate("127.0.0.1", port, ae_title="DIANA")
        assert assoc.is_established
        try:
            request = C_STORE()
            request.MessageID = 1
            request.AffectedSOPClassUID = CTImageStorage
            request.AffectedSOPInstanceUID = generate_uid()
            request.Priority = 2
            context_id = assoc.accepted_contexts[0].context_id
            # The response is ours to read, not the association thread's: paused as send_c_store does.
            assoc._reactor_checkpoint.clear()
            while not assoc._is_paused:
                time.sleep(0.001)
            assoc.dimse.send_msg(request, context_id)  # no DataSet: CommandDataSetType 0x0101
            _, response = assoc.dimse.get_msg(block=True)
            assoc._reactor_checkpoint.set()
            assert response is not None and response.Status == STATUS.CANNOT_UNDERSTAND
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert ingest.calls == 0
    assert [event for event, _ in logged] == ["store.rejected"]
    assert logged[0][1]["reason"] == "C-STORE without a data set"
    assert list(tmp_path.iterdir()) == []
