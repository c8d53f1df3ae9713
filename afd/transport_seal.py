"""Sealing the window transport's messages: AES-256-GCM per link under the run's key, encrypted or (trusted) MAC'd.

The run's key is HKDF-SHA256 of its CURVE client secret: the processes that hold it are exactly the ones CURVE
admits to the run's control plane, so a message that opens came from one of the run's authenticated peers. Each
link (one writer process's connection to one host's agent) picks a random 16-byte id and seals under its own key,
HKDF(run key, salt = link id); its nonces are a direction word and the message's counter, so no nonce repeats
under a key. The agent opens only counters above the link's last one (no replay, no reordering: a link's messages
arrive in order on one connection) and answers reads sealed under the same link key.

A sealed message, after the op frame: seal = link id (16) | counter (8, little-endian) | send time (8, ns, the
sender's CLOCK_MONOTONIC: the transfer figure of afd bench where both hosts are one machine); the meta frames
(headers, slot indices) in clear, authenticated; then
  encrypted: the body encrypted, with its 16-byte tag appended;
  trusted:   the body in clear, then tags = tag(op, seal, meta, body tag) | body tag (GMAC over the body).
Trusted is for a network the user declares trusted (`control.trusted_network`): whoever can read that network reads
the rows, but nobody without the run's key can write a window or ring a doorbell, nor change a row on the way.

On the stream wire (afd.comm_remote's raw TCP links, what the agents serve) a message's head and body are sealed
apart, so the agent knows where the body goes before it arrives and can take it straight into the window:
  head: seal | meta, then head tag = tag(op, seal, meta, body length) (nonce: to-agent, counter);
  body: encrypted: the body encrypted, then its tag; trusted: the body in clear, then its GMAC tag (nonce: body,
        counter, so a body opens only with its own head).
The agent opens the head (the run's key, a fresh counter) before it takes the body; a body whose tag fails is
refused, its rows are zeroed where they landed, and the connection is closed.
"""
from __future__ import annotations

import os
import struct
import time

from .errors import KernelError

ENCRYPTED, TRUSTED = "encrypted", "trusted"
_SEAL = struct.Struct("<16sQQ")
_LEN = struct.Struct("<Q")
SEAL_BYTES, TAG_BYTES = _SEAL.size, 16
_TO_AGENT, _REPLY, _BODY = 0, 1, 2
_INFO_RUN = b"afd-sim window transport v1"
_INFO_LINK = b"afd-sim window link v1"


def _hkdf(key: bytes, info: bytes, salt: bytes | None = None) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(hashes.SHA256(), 32, salt=salt, info=info).derive(key)


def transport_key(keys: dict | None) -> bytes | None:
    """The run's transport key from its CURVE keys (None without keys)."""
    if not keys:
        return None
    return _hkdf(keys["client_secret"].encode(), _INFO_RUN)


def seal_mode(trusted_network: bool) -> str:
    return TRUSTED if trusted_network else ENCRYPTED


def preload() -> None:
    """Import the seal's cipher and key derivation now: an agent opens its first message inside the run, where an
    import that takes a loaded machine a second silences its heartbeats."""
    from cryptography.exceptions import InvalidTag  # noqa: F401
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: F401
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: F401


def _aead(key: bytes, link_id: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    return AESGCM(_hkdf(key, _INFO_LINK, salt=link_id))


def _nonce(direction: int, counter: int) -> bytes:
    return struct.pack("<IQ", direction, counter)


def _aad(op: bytes, seal: bytes, meta) -> bytes:
    return b"".join([op, seal, *(len(m).to_bytes(4, "little") + bytes(m) for m in meta)])


def _check_mode(mode: str) -> None:
    if mode not in (ENCRYPTED, TRUSTED):
        raise ValueError(f"seal: mode {mode!r} is not one of {ENCRYPTED!r}, {TRUSTED!r}")


class LinkSealer:
    """The writer's end of one link: seals its messages in order, opens the agent's replies."""

    def __init__(self, key: bytes, mode: str = ENCRYPTED):
        _check_mode(mode)
        self.mode, self.encrypts = mode, mode == ENCRYPTED
        self.link_id = os.urandom(16)
        self.aead = _aead(key, self.link_id)
        self.counter = 0

    def seal(self, op: bytes, meta: list, body) -> list:
        """[op, seal, *meta, body sealed (+ tags when trusted)]."""
        self.counter += 1
        c = self.counter
        seal = _SEAL.pack(self.link_id, c, time.monotonic_ns())
        aad = _aad(op, seal, meta)
        if self.encrypts:
            return [op, seal, *meta, self.aead.encrypt(_nonce(_TO_AGENT, c), body, aad)]
        body_tag = self.aead.encrypt(_nonce(_BODY, c), b"", body)  # GMAC over the body where it is
        return [op, seal, *meta, body, self.aead.encrypt(_nonce(_TO_AGENT, c), b"", aad + body_tag) + body_tag]

    def seal_head(self, op: bytes, meta: list, body_len: int) -> tuple[bytes, bytes]:
        """(seal, head tag) of the next message on the stream wire, whose body has body_len bytes."""
        self.counter += 1
        c = self.counter
        seal = _SEAL.pack(self.link_id, c, time.monotonic_ns())
        return seal, self.aead.encrypt(_nonce(_TO_AGENT, c), b"", _aad(op, seal, meta) + _LEN.pack(body_len))

    def seal_body_into(self, body, out) -> None:
        """Encrypted: the body of the message just headed (seal_head), encrypted with its tag into out (len(body)
        + 16 bytes, a buffer the caller reuses: no fresh allocation per message)."""
        self.aead.encrypt_into(_nonce(_BODY, self.counter), body, b"", out)

    def body_tag(self, body) -> bytes:
        """Trusted: the GMAC tag of the body of the message just headed, which travels in clear."""
        return self.aead.encrypt(_nonce(_BODY, self.counter), b"", body)

    def open_reply(self, counter: int, frames: list) -> bytes | None:
        """The data of the agent's reply [kind, seq, sealed] to the request sealed with `counter`; None when it does
        not open (a forgery, or a reply to another request)."""
        from cryptography.exceptions import InvalidTag
        try:
            return self.aead.decrypt(_nonce(_REPLY, counter), frames[2], frames[0] + frames[1])
        except InvalidTag:
            return None


class SealOpener:
    """The agent's end: opens every link's messages under its link key, in order, once."""

    def __init__(self, key: bytes, mode: str = ENCRYPTED):
        _check_mode(mode)
        self.key, self.mode = key, mode
        self.links: dict[bytes, list] = {}  # link id -> [aead, last counter]: only links whose messages opened

    def open(self, frames: list) -> tuple[list, object, int]:
        """([identity, op, *meta, body] in clear, reply(kind, seq, data) -> sealed data, send time) of a sealed
        [identity, op, seal, *meta, body(, tags)]; KernelError when it does not open."""
        from cryptography.exceptions import InvalidTag
        trusted = self.mode == TRUSTED
        if len(frames) < (5 if trusted else 4) or len(frames[2]) != _SEAL.size:
            raise KernelError("seal", "a message without the run's seal")
        op, seal = bytes(frames[1]), bytes(frames[2])
        link_id, counter, t_send, aead = self._fresh(seal)
        meta = frames[3:-2] if trusted else frames[3:-1]
        aad = _aad(op, seal, meta)
        try:
            if trusted:
                body, tags = frames[-2], bytes(frames[-1])
                if len(tags) != 32:
                    raise InvalidTag()
                aead.decrypt(_nonce(_TO_AGENT, counter), tags[:16], aad + tags[16:])
                aead.decrypt(_nonce(_BODY, counter), tags[16:], body)
            else:
                body = aead.decrypt(_nonce(_TO_AGENT, counter), frames[-1], aad)
        except InvalidTag:
            raise KernelError("seal", "a message that does not open under the run's key") from None
        return [frames[0], op, *meta, body], self.replier(self._opened(link_id, aead, counter), counter), t_send

    def open_head(self, op: bytes, seal: bytes, meta: list, body_len: int, tag: bytes) -> tuple[object, int, int]:
        """Stream wire: (link, counter, send time) of a head that opens under its link key with a fresh counter
        (the counter is then the link's); KernelError otherwise. The body is opened with open_body(link, ...)."""
        from cryptography.exceptions import InvalidTag
        if len(seal) != _SEAL.size or len(tag) != TAG_BYTES:
            raise KernelError("seal", "a message without the run's seal")
        link_id, counter, t_send, aead = self._fresh(seal)
        try:
            aead.decrypt(_nonce(_TO_AGENT, counter), tag, _aad(op, seal, meta) + _LEN.pack(body_len))
        except InvalidTag:
            raise KernelError("seal", "a message that does not open under the run's key") from None
        return self._opened(link_id, aead, counter), counter, t_send

    def _fresh(self, seal: bytes) -> tuple[bytes, int, int, object]:
        """(link id, counter, send time, the link's cipher) of a seal whose counter is past its link's last one;
        KernelError for a replay."""
        link_id, counter, t_send = _SEAL.unpack(seal)
        known = self.links.get(link_id)
        if known and counter <= known[1]:
            raise KernelError("seal", f"message {counter} of a link that is at {known[1]}: a replay")
        return link_id, counter, t_send, known[0] if known else _aead(self.key, link_id)

    def _opened(self, link_id: bytes, aead, counter: int) -> list:
        """The link's [cipher, last counter] once its message `counter` opened (a link is known from its first)."""
        link = self.links.setdefault(link_id, [aead, counter])
        link[1] = counter
        return link

    def open_body(self, link, counter: int, sealed, out) -> None:
        """Stream wire, the body of an opened head: encrypted, `sealed` (body + tag) decrypted into out; trusted,
        `sealed` is the tag and out the body in clear, checked. KernelError when it does not open (out then holds
        what arrived: the caller wipes it)."""
        from cryptography.exceptions import InvalidTag
        try:
            if self.mode == TRUSTED:
                link[0].decrypt(_nonce(_BODY, counter), sealed, out)
            else:
                link[0].decrypt_into(_nonce(_BODY, counter), sealed, b"", out)
        except InvalidTag:
            raise KernelError("seal", "a message body that does not open under the run's key") from None

    def replier(self, link, counter: int):
        """reply(kind, seq, data) -> the sealed data of the answer to the request `counter` of `link`."""
        return lambda kind, seq, data: link[0].encrypt(_nonce(_REPLY, counter), data, kind + seq)
