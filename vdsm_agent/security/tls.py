"""The TLS listener's server context: our certificate, a CA bundle, client certificates required.

* TLS 1.2 or newer; for TLS 1.2 only ECDHE key exchange with AEAD ciphers
  (TLS 1.3 suites are all fine and not configurable here).
* Every client must present a certificate that chains to a CA of ``tls_ca``
  and is within its validity period; otherwise the handshake fails and no
  HTTP request is ever read.
* No renegotiation (the peer's identity is fixed for the connection), no
  compression.

Every problem with the files (missing, unreadable, not PEM, a key that does
not match the certificate, an encrypted key, a CA file without certificates)
is a ``TlsConfigError`` whose message names the setting and the file: the
agent prints it and exits with status 2, never a traceback.
"""

from __future__ import annotations

import os
import ssl

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"


class TlsConfigError(ValueError):
    """The TLS settings cannot be used; the message says which and why."""


def _check_file(setting: str, path: str) -> None:
    if not path:
        raise TlsConfigError(f"{setting} is required with tls_listen")
    try:
        with open(path, "rb") as stream:
            head = stream.read(65536)
    except OSError as exc:
        raise TlsConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in head:
        raise TlsConfigError(f"{setting}: {path} is not a PEM file")


def _no_password() -> str:
    raise TlsConfigError("tls_key: the private key is encrypted; the agent cannot ask for "
                         "a passphrase (decrypt it: openssl pkey -in KEY -out KEY.plain)")


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The server SSLContext for the TLS listener; ``TlsConfigError`` when it cannot be made."""
    _check_file("tls_cert", cert)
    _check_file("tls_key", key)
    _check_file("tls_ca", ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_ciphers(TLS12_CIPHERS)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        if "KEY_VALUES_MISMATCH" in reason:
            raise TlsConfigError(f"tls_key: {key} does not match the certificate in "
                                 f"{cert}") from None
        raise TlsConfigError(f"tls_cert/tls_key: cannot load {cert} with {key}: "
                             f"{reason}") from None
    except OSError as exc:
        raise TlsConfigError(f"tls_cert/tls_key: {exc.strerror or exc}") from None
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"tls_ca: {ca} holds no usable CA certificate: "
                             f"{exc.reason or exc}") from None
    except OSError as exc:
        raise TlsConfigError(f"tls_ca: cannot read {ca}: {exc.strerror or exc}") from None
    if not context.get_ca_certs():
        raise TlsConfigError(f"tls_ca: {ca} holds no CA certificate")
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False  # a server does not check its clients' host names
    return context


def check_settings(tls_listen: object, cert: str, key: str, ca: str) -> ssl.SSLContext | None:
    """The context when TLS is configured, None when it is not; ``TlsConfigError`` if half-done."""
    if tls_listen is None:
        stray = [name for name, value in (("tls_cert", cert), ("tls_key", key),
                                          ("tls_ca", ca)) if value]
        if stray:
            raise TlsConfigError(f"{', '.join(stray)} set but tls_listen is not: set "
                                 "tls_listen HOST:PORT to serve TLS, or remove them")
        return None
    return server_context(os.fspath(cert), os.fspath(key), os.fspath(ca))
