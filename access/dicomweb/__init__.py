"""DICOMweb: QIDO-RS and WADO-RS over the index and the archive, on an ASGI stack (Starlette, uvicorn)."""
