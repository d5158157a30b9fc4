"""TLS client contexts for relays and brokers: verification on, host names checked,
TLS 1.2 at least. There is deliberately no switch to turn verification off."""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["client_context"]


def client_context(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A verifying context trusting ``ca_file``, or the system store when it is None."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context
