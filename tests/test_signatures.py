"""Unit tests for the payload protocol and the signatures (SPEC sections 2 and 3).

RSA public keys in both PEM forms, PKCS#1 v1.5 SHA-256 verification against independent
signers (OpenSSL's command line, test_load's RsaPrivateKey), the Bleichenbacher 2006 forgery,
the canonical signed message, the replay window, verify_auth, and from_json_fields.

The keys are test data (tests/data/README.md says how each was made): generating the 3072-bit
e = 3 key in pure Python takes seconds, and a fixed key makes every signature deterministic.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import random
import shutil
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
from support import DATA, load_private_key

import pyworker
from pyworker import (
    ApiPayload,
    AuthData,
    JsonDataException,
    KeyFormatError,
    ReplayGuard,
    RsaPublicKey,
    from_json_fields,
    verify_auth,
)
from test_load import LocalAutoscaler, RsaPrivateKey

SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def der_int(value: int) -> bytes:
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def pem(label: str, data: bytes) -> str:
    b64 = base64.b64encode(data).decode()
    body = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def pkcs1_public_der(n: int, e: int) -> bytes:
    """RFC 8017 A.1.1 RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }."""
    return der(0x30, der_int(n) + der_int(e))


def spki_der(n: int, e: int) -> bytes:
    algorithm = der(0x30, der(0x06, bytes.fromhex("2a864886f70d010101")) + b"\x05\x00")
    return der(0x30, algorithm + der(0x03, b"\x00" + pkcs1_public_der(n, e)))


KEY = load_private_key("test_key.pem")
OTHER_KEY = load_private_key("other_key.pem")
E3_KEY = load_private_key("e3_key.pem")


def signed(key: RsaPrivateKey = KEY, **fields: Any) -> AuthData:
    values: dict[str, Any] = {
        "cost": "20",
        "endpoint": "my-endpoint",
        "reqnum": 7,
        "url": "http://203.0.113.9:40123",
    }
    values.update(fields)
    return AuthData(**key.sign_auth(**values))


# Public keys #####################################################################################


def test_test_data_keys_are_what_the_readme_says() -> None:
    assert (KEY.n.bit_length(), KEY.e) == (2048, 65537)
    assert (OTHER_KEY.n.bit_length(), OTHER_KEY.e) == (2048, 65537)
    assert (E3_KEY.n.bit_length(), E3_KEY.e) == (3072, 3)
    for key in (KEY, OTHER_KEY, E3_KEY):
        assert key.n == key.p * key.q
        assert pow(pow(12345, key.e, key.n), key.d, key.n) == 12345


def test_from_pem_subject_public_key_info() -> None:
    text = (DATA / "test_key.pub.pem").read_text()
    assert text.startswith("-----BEGIN PUBLIC KEY-----")
    key = RsaPublicKey.from_pem(text)
    assert (key.n, key.e) == (KEY.n, KEY.e)
    assert key.size == 256
    assert RsaPublicKey.from_pem(text.encode()) == key  # bytes, as fetched from /pubkey/


def test_from_pem_pkcs1_made_by_openssl() -> None:
    text = (DATA / "test_key.rsapub.pem").read_text()  # openssl rsa -RSAPublicKey_out
    assert text.startswith("-----BEGIN RSA PUBLIC KEY-----")
    key = RsaPublicKey.from_pem(text)
    assert (key.n, key.e) == (KEY.n, KEY.e)


def test_from_pem_pkcs1_encoded_here() -> None:
    text = pem("RSA PUBLIC KEY", pkcs1_public_der(KEY.n, KEY.e))
    assert text == (DATA / "test_key.rsapub.pem").read_text()  # the same bytes as OpenSSL's
    assert RsaPublicKey.from_pem(text) == RsaPublicKey(KEY.n, KEY.e)


def test_from_pem_test_load_signer_and_e3_key() -> None:
    assert RsaPublicKey.from_pem(KEY.public_pem()) == KEY.public_key
    e3 = RsaPublicKey.from_pem(E3_KEY.public_pem())
    assert (e3.e, e3.size) == (3, 384)


PEM_LAYOUTS: list[tuple[str, Callable[[str], str]]] = [
    ("crlf", lambda s: s.replace("\n", "\r\n")),
    ("text", lambda s: "subject=CN test\nissuer: nobody\n" + s + "\ntrailing"),
    ("no-final-newline", lambda s: s.strip()),
    ("indented", lambda s: "  \n" + s.replace("\n", "\n  ")),
]


@pytest.mark.parametrize("decorate", [pytest.param(f, id=i) for i, f in PEM_LAYOUTS])
def test_from_pem_tolerates_layout(decorate: Callable[[str], str]) -> None:
    for name in ("test_key.pub.pem", "test_key.rsapub.pem"):
        text = decorate((DATA / name).read_text())
        assert RsaPublicKey.from_pem(text) == RsaPublicKey(KEY.n, KEY.e)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("hello, world", id="no-pem"),
        pytest.param("-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n", id="empty-block"),
        pytest.param("-----BEGIN PUBLIC KEY-----\nAAA\n-----END PUBLIC KEY-----\n", id="bad-pad"),
        pytest.param("-----BEGIN PUBLIC KEY-----\nMI!B\n-----END PUBLIC KEY-----\n", id="bad-b64"),
        pytest.param(
            "-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(b"\x30\x03abc").decode() + "\n"
            "-----END PUBLIC KEY-----\n",
            id="der-garbage",
        ),
        pytest.param(pem("PUBLIC KEY", b"\x04\x10" + bytes(range(16))), id="not-a-sequence"),
        pytest.param(
            (DATA / "test_key.pub.pem").read_text().replace("END PUBLIC", "END PRIVATE"),
            id="mismatched-labels",
        ),
        pytest.param((DATA / "test_key.pem").read_text(), id="private-key"),
        pytest.param((DATA / "ec_p256.pub.pem").read_text(), id="ec-p256"),
        pytest.param((DATA / "ed25519.pub.pem").read_text(), id="ed25519"),
        pytest.param(pem("RSA PUBLIC KEY", spki_der(KEY.n, KEY.e)), id="spki-labelled-pkcs1"),
        pytest.param(pem("PUBLIC KEY", pkcs1_public_der(KEY.n, KEY.e)), id="pkcs1-labelled-spki"),
        pytest.param(pem("PUBLIC KEY", spki_der(KEY.n, KEY.e) + b"\x00"), id="trailing-byte"),
        pytest.param(pem("RSA PUBLIC KEY", pkcs1_public_der(2**511 + 1, 65537)), id="512-bit"),
        pytest.param(pem("RSA PUBLIC KEY", pkcs1_public_der(KEY.n, 65536)), id="even-e"),
        pytest.param(pem("RSA PUBLIC KEY", pkcs1_public_der(KEY.n, 1)), id="e-1"),
        pytest.param(pem("RSA PUBLIC KEY", pkcs1_public_der(KEY.n, KEY.n + 2)), id="e-over-n"),
        pytest.param(
            pem("RSA PUBLIC KEY", der(0x30, der_int(KEY.n) + der_int(KEY.e) + der_int(1))),
            id="three-integers",
        ),
    ],
)
def test_from_pem_rejects_with_key_format_error(text: str) -> None:
    with pytest.raises(KeyFormatError):
        RsaPublicKey.from_pem(text)


@pytest.mark.parametrize("form", ["spki", "pkcs1"])
def test_truncated_keys_raise_key_format_error_at_every_length(form: str) -> None:
    # Guards the DER reader's bounds checks: a short read must not become an IndexError or a
    # smaller, wrong key.
    full = spki_der(KEY.n, KEY.e) if form == "spki" else pkcs1_public_der(KEY.n, KEY.e)
    label = "PUBLIC KEY" if form == "spki" else "RSA PUBLIC KEY"
    for cut in range(len(full)):
        with pytest.raises(KeyFormatError):
            RsaPublicKey.from_pem(pem(label, full[:cut]))
    pem_text = pem(label, full)
    for cut in range(len(pem_text) - 40, len(pem_text) - 1):  # the END line cut short
        with pytest.raises(KeyFormatError):
            RsaPublicKey.from_pem(pem_text[:cut])


def test_mutated_keys_parse_or_raise_key_format_error_only() -> None:
    # h11's fuzz rule: any input either parses or raises the one error, never anything else.
    rng = random.Random(2006)
    for form, full in (("spki", spki_der(KEY.n, KEY.e)), ("pkcs1", pkcs1_public_der(KEY.n, KEY.e))):
        loader = RsaPublicKey.from_spki_der if form == "spki" else RsaPublicKey.from_pkcs1_der
        for _ in range(3000):
            data = bytearray(full)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.2:
                data = data[: rng.randrange(len(data))]
            try:
                key = loader(bytes(data))
            except KeyFormatError:
                continue
            assert 1024 <= key.n.bit_length() <= 8192 and key.e % 2 == 1


# Verification ####################################################################################


def test_verify_accepts_test_load_signer() -> None:
    message = b"any message at all"
    assert KEY.public_key.verify(message, KEY.sign(message))
    assert E3_KEY.public_key.verify(message, E3_KEY.sign(message))


def test_verify_rejects_other_message_key_and_bit_flips() -> None:
    message = b"any message at all"
    signature = KEY.sign(message)
    assert not KEY.public_key.verify(b"any message at alL", signature)
    assert not KEY.public_key.verify(message, OTHER_KEY.sign(message))
    assert not OTHER_KEY.public_key.verify(message, signature)
    for i in (0, 1, 100, 255):
        flipped = bytearray(signature)
        flipped[i] ^= 0x01
        assert not KEY.public_key.verify(message, bytes(flipped))


SIGNATURE_MANGLES: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("short", lambda s: s[:-1]),
    ("first-byte-dropped", lambda s: s[1:]),
    ("leading-zero", lambda s: b"\x00" + s),
    ("trailing-zero", lambda s: s + b"\x00"),
    ("empty", lambda s: b""),
    ("zero", lambda s: bytes(len(s))),
    ("one", lambda s: b"\x01".rjust(len(s), b"\x00")),
    ("n", lambda s: KEY.n.to_bytes(len(s), "big")),
    ("all-ff", lambda s: b"\xff" * len(s)),
]


@pytest.mark.parametrize("mangle", [pytest.param(f, id=i) for i, f in SIGNATURE_MANGLES])
def test_verify_rejects_malformed_signatures(mangle: Callable[[bytes], bytes]) -> None:
    message = b"any message at all"
    assert not KEY.public_key.verify(message, mangle(KEY.sign(message)))


def test_verify_rejects_signature_plus_modulus() -> None:
    # s + n is the same value mod n; RFC 8017 8.2.2 / 5.2.2 step 1 demands s < n, which keeps
    # signatures non-malleable. Find a message whose s + n still fits in k bytes.
    k = KEY.public_key.size
    for i in range(200):
        message = b"message %d" % i
        s = int.from_bytes(KEY.sign(message), "big")
        if s + KEY.n < 1 << (8 * k):
            break
    else:
        pytest.fail("no signature small enough to add n to")
    assert KEY.public_key.verify(message, s.to_bytes(k, "big"))
    assert not KEY.public_key.verify(message, (s + KEY.n).to_bytes(k, "big"))


def test_verify_accepts_openssl_signature(tmp_path: Path) -> None:
    # An independent implementation signs; pyworker must verify it byte for byte.
    if shutil.which("openssl") is None:
        pytest.skip("the openssl binary is not installed")
    message = signed().message()
    (tmp_path / "message").write_bytes(message)
    result = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(DATA / "test_key.pem"), "message"],
        cwd=tmp_path,
        capture_output=True,
        check=True,
        timeout=30,
    )
    signature = result.stdout
    assert len(signature) == 256
    assert signature == KEY.sign(message)  # PKCS#1 v1.5 is deterministic: the same bytes
    for name in ("test_key.pub.pem", "test_key.rsapub.pem"):
        key = RsaPublicKey.from_pem((DATA / name).read_text())
        assert key.verify(message, signature)
        assert not key.verify(message + b" ", signature)


def test_verify_accepts_openssl_generated_key_and_signature(tmp_path: Path) -> None:
    # Key, both public PEMs and the signature all from OpenSSL: nothing from this project.
    if shutil.which("openssl") is None:
        pytest.skip("the openssl binary is not installed")

    def openssl(*args: str) -> bytes:
        return subprocess.run(
            ["openssl", *args], cwd=tmp_path, capture_output=True, check=True, timeout=60
        ).stdout

    openssl("genrsa", "-out", "key.pem", "3072")
    spki = openssl("rsa", "-in", "key.pem", "-pubout")
    pkcs1 = openssl("rsa", "-in", "key.pem", "-RSAPublicKey_out")
    message = signed(cost=20, url="http://[::1]:8080", reqnum=2**40).message()
    (tmp_path / "message").write_bytes(message)
    signature = openssl("dgst", "-sha256", "-sign", "key.pem", "message")
    for text in (spki, pkcs1):
        key = RsaPublicKey.from_pem(text)
        assert key.size == 384
        assert key.verify(message, signature)
        assert not key.verify(message, KEY.sign(message))


# Bleichenbacher 2006 #############################################################################
# For e = 3 and a long enough modulus, a forger picks s = ceil(cbrt(P * 2**g)) where P is the
# block's start 00 01 FF 00 DigestInfo hash and g the bits left: s**3 < n, so "decrypting" s
# gives P followed by garbage. A verifier that parses the block (skip the FFs, read the
# DigestInfo and hash, ignore what follows) accepts it; one that builds the whole expected block
# and compares does not. https://mailarchive.ietf.org/arch/msg/openpgp/5rnE9ZRN1AokBVj3VqblGlP63QE


def integer_cube_root_ceil(x: int) -> int:
    lo, hi = 0, 1 << (x.bit_length() // 3 + 2)
    while lo < hi:
        mid = (lo + hi) // 2
        if mid**3 < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def forge_signature(key: RsaPublicKey, message: bytes, ff_bytes: int) -> bytes:
    """A signature made with the public key only, whose cube starts with a valid-looking block."""
    k = key.size
    prefix = b"\x00\x01" + b"\xff" * ff_bytes + b"\x00"
    prefix += SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    garbage_bits = 8 * (k - len(prefix))
    low = int.from_bytes(prefix, "big") << garbage_bits
    s = integer_cube_root_ceil(low)
    assert low <= s**3 < low + (1 << garbage_bits) < key.n  # no reduction mod n happens
    return s.to_bytes(k, "big")


def naive_parsing_verify(key: RsaPublicKey, message: bytes, signature: bytes) -> bool:
    """The broken verifier of 2006: parse the block, never check that nothing follows the hash."""
    if len(signature) != key.size:
        return False
    block = pow(int.from_bytes(signature, "big"), key.e, key.n).to_bytes(key.size, "big")
    if block[:2] != b"\x00\x01":
        return False
    end = block.index(b"\x00", 2)
    if end == 2 or any(b != 0xFF for b in block[2:end]):
        return False
    digest_info = block[end + 1 :]
    expected = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    return digest_info[: len(expected)] == expected  # the flaw: the rest is ignored


@pytest.mark.parametrize("ff_bytes", [1, 8])  # 8: the minimum padding most parsers check
def test_bleichenbacher_forgery_is_rejected(ff_bytes: int) -> None:
    key = E3_KEY.public_key
    auth = signed(E3_KEY)
    message = auth.message()
    assert key.verify(message, E3_KEY.sign(message))  # the key itself works
    assert naive_parsing_verify(key, message, E3_KEY.sign(message))

    forged = forge_signature(key, message, ff_bytes)
    block = pow(int.from_bytes(forged, "big"), 3, key.n).to_bytes(key.size, "big")
    assert block.startswith(b"\x00\x01" + b"\xff" * ff_bytes + b"\x00" + SHA256_DIGEST_INFO)
    assert naive_parsing_verify(key, message, forged)  # the forgery fools a parser ...
    assert not key.verify(message, forged)  # ... and not pyworker

    auth.signature = base64.b64encode(forged).decode()
    assert verify_auth(key, auth, ReplayGuard()) == "bad signature"


# The canonical message ###########################################################################


def test_message_is_python_json_dumps_indent_4_in_field_order() -> None:
    auth = AuthData(
        signature="c2ln", cost="20", endpoint="my-endpoint", reqnum=7, url="http://1.2.3.4:5"
    )
    assert auth.message() == (
        b'{\n    "cost": "20",\n    "endpoint": "my-endpoint",\n    "reqnum": 7,\n'
        b'    "url": "http://1.2.3.4:5"\n}'
    )
    fields = {"cost": "20", "endpoint": "my-endpoint", "reqnum": 7, "url": "http://1.2.3.4:5"}
    assert auth.message() == json.dumps(fields, indent=4).encode()


def test_message_key_order_is_fixed_whatever_the_client_sent() -> None:
    received = {
        "url": "http://1.2.3.4:5",
        "__request_id": "ab12",
        "reqnum": 7,
        "signature": "c2ln",
        "endpoint": "e",
        "cost": 3,
    }
    auth = AuthData.from_json_msg(received)
    keys = [line.split(":")[0].strip() for line in auth.message().decode().splitlines()[1:-1]]
    assert keys == ['"cost"', '"endpoint"', '"reqnum"', '"url"']


@pytest.mark.parametrize(
    ("cost", "rendered"),
    [("20", b'"20"'), (20, b"20"), (20.0, b"20.0"), (0.1, b"0.1"), (1e-07, b"1e-07")],
)
def test_message_keeps_cost_as_received(cost: Any, rendered: bytes) -> None:
    auth = AuthData.from_json_msg(
        {"signature": "", "cost": cost, "endpoint": "e", "reqnum": 1, "url": "u"}
    )
    assert auth.cost == cost and type(auth.cost) is type(cost)
    assert b'"cost": ' + rendered + b",\n" in auth.message()


def test_message_escapes_non_ascii_like_python() -> None:
    auth = AuthData(signature="", cost=1, endpoint="caf\u00e9 \U0001f600", reqnum=1, url="u")
    assert b'"endpoint": "caf\\u00e9 \\ud83d\\ude00"' in auth.message()


def test_cost_string_and_number_sign_different_bytes() -> None:
    as_string, as_number = signed(cost="20"), signed(cost=20)
    assert as_string.message() != as_number.message()
    assert verify_auth(KEY.public_key, as_string, ReplayGuard()) is None
    assert verify_auth(KEY.public_key, as_number, ReplayGuard()) is None
    swapped = dataclasses.replace(as_string, cost=20)  # "20"'s signature on the number 20
    assert verify_auth(KEY.public_key, swapped, ReplayGuard()) == "bad signature"


# Replay ##########################################################################################


def msg(i: int) -> bytes:
    return b"message %d" % i


def test_replay_guard_stale_reqnum() -> None:
    guard = ReplayGuard()
    assert guard.check(1000, msg(1)) is None
    guard.record(1000, msg(1))
    assert guard.check(899, msg(2)) == "stale reqnum"  # more than 100 below the highest
    assert guard.check(900, msg(2)) is None  # exactly 100 below: still in the window
    assert guard.check(5000, msg(3)) is None  # far ahead is fine
    guard.record(950, msg(4))  # a lower one accepted does not lower the bar
    assert guard.highest == 1000
    assert guard.check(899, msg(5)) == "stale reqnum"


def test_replay_guard_exact_replay_within_last_100() -> None:
    guard = ReplayGuard()
    for i in range(100):
        guard.record(5, msg(i))  # same reqnum: only the message tells them apart
    for i in range(100):
        assert guard.check(5, msg(i)) == "replayed request"
    assert guard.check(5, msg(100)) is None
    guard.record(5, msg(100))  # the 101st pushes the oldest out of the window
    assert guard.check(5, msg(0)) is None
    assert guard.check(5, msg(1)) == "replayed request"


def test_replay_guard_check_does_not_record() -> None:
    guard = ReplayGuard()
    assert guard.check(10**9, msg(1)) is None
    assert guard.highest is None  # only record() (after a good signature) moves the bar
    assert guard.check(10**9, msg(1)) is None


def test_replay_guard_memory_is_bounded() -> None:
    # Guards a leak: the history must not grow with the number of requests served (an
    # unbounded one grows about 1.4 MB over these 10,000 records).
    tracemalloc.start()
    try:
        guard = ReplayGuard()
        for i in range(1000):
            guard.record(i, msg(i))
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000, 11_000):
            guard.record(i, msg(i))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 10_000, f"ReplayGuard grew {grown} bytes over 10,000 records"
    for i in range(10_900, 11_000):
        assert guard.check(i, msg(i)) == "replayed request"
    assert guard.check(10_898, msg(10_898)) == "stale reqnum"
    assert guard.check(10_899, msg(10_899)) is None  # in the reqnum window, out of the history


# verify_auth #####################################################################################


def test_verify_auth_accepts_then_refuses_the_replay() -> None:
    guard = ReplayGuard()
    auth = signed()
    assert verify_auth(KEY.public_key, auth, guard) is None
    assert verify_auth(KEY.public_key, auth, guard) == "replayed request"
    assert verify_auth(KEY.public_key, signed(reqnum=8), guard) is None


def test_verify_auth_stale_reqnum() -> None:
    guard = ReplayGuard()
    assert verify_auth(KEY.public_key, signed(reqnum=500), guard) is None
    assert verify_auth(KEY.public_key, signed(reqnum=399), guard) == "stale reqnum"
    assert verify_auth(KEY.public_key, signed(reqnum=400), guard) is None


def test_failed_verification_records_nothing() -> None:
    # A forged request with a huge reqnum must not push honest ones out as "stale".
    guard = ReplayGuard()
    forged = signed(OTHER_KEY, reqnum=10**12)
    assert verify_auth(KEY.public_key, forged, guard) == "bad signature"
    assert guard.highest is None
    assert verify_auth(KEY.public_key, signed(reqnum=1), guard) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cost", "21"),
        ("cost", 20),
        ("endpoint", "my-endpoinT"),
        ("reqnum", 8),
        ("url", "http://203.0.113.9:40124"),
    ],
)
def test_verify_auth_tampered_field(field: str, value: Any) -> None:
    auth = dataclasses.replace(signed(), **{field: value})
    assert verify_auth(KEY.public_key, auth, ReplayGuard()) == "bad signature"


def test_verify_auth_wrong_key() -> None:
    assert verify_auth(KEY.public_key, signed(OTHER_KEY), ReplayGuard()) == "bad signature"
    assert verify_auth(OTHER_KEY.public_key, signed(KEY), ReplayGuard()) == "bad signature"


BASE64_MANGLES: list[tuple[str, Callable[[str], str]]] = [
    ("punctuation", lambda s: "not base64!"),
    ("padding-stripped", lambda s: s.rstrip("=")),
    ("truncated-text", lambda s: s[:-1]),
    ("urlsafe-alphabet", lambda s: s.replace("+", "-").replace("/", "_")),
    ("newline", lambda s: s[:100] + "\n" + s[100:]),
    ("extra-padding", lambda s: s + "="),
    ("non-ascii", lambda s: "\u00e9" + s),
]


@pytest.mark.parametrize("mangle", [pytest.param(f, id=i) for i, f in BASE64_MANGLES])
def test_verify_auth_bad_base64(mangle: Callable[[str], str]) -> None:
    auth = signed()
    mangled = mangle(auth.signature)
    assert mangled != auth.signature
    auth.signature = mangled
    assert verify_auth(KEY.public_key, auth, ReplayGuard()) == "signature is not base64"


@pytest.mark.parametrize("length", [0, 1, 128, 255, 257, 512])
def test_verify_auth_wrong_length(length: int) -> None:
    auth = signed()
    raw = base64.b64decode(auth.signature)
    auth.signature = base64.b64encode((raw * 3)[:length]).decode()
    assert verify_auth(KEY.public_key, auth, ReplayGuard()) == "bad signature"


@pytest.mark.parametrize("size", [pyworker.MAX_SIGNATURE_B64 + 4, 10_000_000])
def test_verify_auth_huge_base64_is_refused_before_decoding(size: int) -> None:
    auth = signed()
    auth.signature = "A" * size
    assert verify_auth(KEY.public_key, auth, ReplayGuard()) == "signature too long"


def test_verify_auth_8192_bit_signature_fits_the_base64_limit() -> None:
    assert len(base64.b64encode(bytes(8192 // 8))) <= pyworker.MAX_SIGNATURE_B64


# The key fetched again (SignatureChecker, SignatureWatch) ########################################


class _Clock:
    """pyworker's `time` module with a monotonic() the test moves: the watch's window and
    the re-fetch interval are minutes, and the event loop keeps its own clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_wrong_size_signature_is_malformed_and_another_key_size_is_a_reason_to_fetch() -> None:
    # L3: guards that a signature no RSA key could have made (a few bytes, truncated to less
    # than 1,024 bits) is counted `malformed`, not as matching no layout, and never makes the
    # key be fetched again; and that one of another key's size (the autoscaler moved to 3,072
    # bits) is `no_layout` and does: else such a change would answer 401 until a restart.
    checker = pyworker.SignatureChecker()
    checker.use_key(KEY.public_key, "test")
    checker.watch.doubt_after = 3
    spawned: list[str] = []

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        spawned.append(coro.__qualname__)
        coro.close()

    checker.spawn = spawn
    checker.client = pyworker.HttpClient("http://127.0.0.1:9")  # never reached: closed above
    for reqnum in range(1, 11):
        auth = signed(KEY, reqnum=reqnum)
        raw = base64.b64decode(auth.signature)
        auth.signature = base64.b64encode(raw[: 16 if reqnum % 2 else 127]).decode()
        assert checker.check(auth) == "bad signature"  # what the client reads, as before
    assert checker.watch.totals == {"malformed": 10} and spawned == []
    for reqnum in range(11, 14):
        assert checker.check(signed(E3_KEY, reqnum=reqnum)) == "bad signature"  # 384 bytes
    assert checker.watch.totals == {"malformed": 10, "no_layout": 3}
    assert spawned == ["SignatureChecker.refetch"]
    checker.watch.close()


def test_key_refetch_counts_refusals_in_a_window_whatever_good_tickets_come_between(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # M1: guards that a client reusing a `url` ticket signed before the key changed (it never
    # expires) cannot hold the re-fetch off, as a good signature resetting an "in a row" count
    # did: the trigger is `doubt_after` no-layout refusals in the last `window` seconds. The
    # re-fetch stays at most once per refetch_interval, from where the key came; nothing
    # unsigned, forged or replayed is accepted on the way.
    clock = _Clock()
    monkeypatch.setattr(pyworker, "time", clock)

    async def main() -> None:
        scaler = LocalAutoscaler(KEY)
        await scaler.start()
        checker = pyworker.SignatureChecker()
        tasks: list[asyncio.Task[None]] = []

        def spawn(coro: Coroutine[Any, Any, None]) -> None:
            tasks.append(asyncio.get_running_loop().create_task(coro))

        async def settle() -> int:
            """Let the re-fetches spawned finish; how many there were."""
            await asyncio.gather(*tasks)
            return len(tasks)

        client = pyworker.HttpClient(scaler.url)
        try:
            checker.spawn = spawn
            await checker.fetch(client)  # at start: the key fetched, at clock.now
            assert checker.pubkey == KEY.public_key and checker.client is client
            url = "https://203.0.113.9:40123"
            stale = KEY.sign_url_auth(cost=1, endpoint="e", reqnum=1, url=url, request_idx=1)
            assert checker.check(AuthData.from_json_msg(stale)) is None
            scaler.key = OTHER_KEY  # the autoscaler's key changes
            clock.now += checker.refetch_interval  # long after the first fetch
            reqnum = 100
            # 19 fresh tickets refused, then the stale one verified, again and again
            for _ in range(5):
                for _ in range(19):
                    clock.now += 0.5
                    reqnum += 1
                    assert checker.check(signed(OTHER_KEY, reqnum=reqnum)) == "bad signature"
                assert checker.check(AuthData.from_json_msg(stale)) is None
            assert await settle() == 1  # fetched again once, at the 20th refusal
            assert checker.pubkey == OTHER_KEY.public_key
            # The new key's tickets are served; the old key's, forgeries, replays are not.
            fresh = signed(OTHER_KEY, reqnum=reqnum + 1)
            assert checker.check(fresh) is None
            checker.spend(fresh)
            assert checker.check(signed(OTHER_KEY, reqnum=reqnum + 1)) == "replayed request"
            assert checker.check(AuthData.from_json_msg(stale)) == "bad signature"
            assert checker.check(signed(E3_KEY, reqnum=reqnum + 2)) == "bad signature"
            # Refusals spread wider than the window are no reason, however many.
            clock.now += checker.refetch_interval
            for n in range(60):
                clock.now += checker.watch.window / (checker.watch.doubt_after - 1) + 0.01
                assert checker.check(signed(KEY, reqnum=reqnum + 10 + n)) == "bad signature"
            assert await settle() == 1
            # 20 within the window are: fetched again (the same key: unchanged) ...
            clock.now += checker.watch.window + 1  # the spread ones out of it
            for n in range(19):
                clock.now += 0.1
                assert checker.check(signed(KEY, reqnum=reqnum + 100 + n)) == "bad signature"
            assert await settle() == 1
            for n in range(19, 20):
                clock.now += 0.1
                assert checker.check(signed(KEY, reqnum=reqnum + 100 + n)) == "bad signature"
            assert await settle() == 2 and checker.pubkey == OTHER_KEY.public_key
            # ... and not again before refetch_interval since then, however many fail
            for n in range(200):
                clock.now += (checker.refetch_interval - 1) / 200
                assert checker.check(signed(KEY, reqnum=reqnum + 200 + n)) == "bad signature"
            assert await settle() == 2
            clock.now += 1
            for n in range(20):
                clock.now += 0.1
                assert checker.check(signed(KEY, reqnum=reqnum + 400 + n)) == "bad signature"
            assert await settle() == 3
            assert checker.key_source == scaler.url + "/pubkey/"
        finally:
            checker.watch.close()
            await client.close()
            await scaler.stop()

    asyncio.run(main())


# AuthData and from_json_fields ###################################################################

GOOD_AUTH: dict[str, Any] = {
    "signature": "c2ln",
    "cost": "20",
    "endpoint": "e",
    "reqnum": 7,
    "url": "http://1.2.3.4:5",
}


def auth_errors(msg: Any) -> dict[str, Any]:
    with pytest.raises(JsonDataException) as info:
        AuthData.from_json_msg(msg)
    return info.value.message


def test_auth_data_valid_and_extra_keys_ignored() -> None:
    auth = AuthData.from_json_msg({**GOOD_AUTH, "__request_id": "x", "extra": [1, 2]})
    assert {name: getattr(auth, name) for name in GOOD_AUTH} == GOOD_AUTH
    assert auth.request_idx is None  # optional: the seed's autoscaler does not send it


@pytest.mark.parametrize("missing", list(GOOD_AUTH))
def test_auth_data_missing_field(missing: str) -> None:
    msg = {k: v for k, v in GOOD_AUTH.items() if k != missing}
    assert auth_errors(msg) == {missing: "missing parameter"}


def test_auth_data_every_missing_field_at_once() -> None:
    assert auth_errors({}) == dict.fromkeys(GOOD_AUTH, "missing parameter")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reqnum", True),  # bool is an int in Python, never in JSON
        ("reqnum", False),
        ("reqnum", "7"),
        ("reqnum", 7.0),
        ("reqnum", None),
        ("signature", 123),
        ("signature", None),
        ("signature", ["c2ln"]),
        ("cost", True),
        ("cost", None),
        ("cost", {"amount": 20}),
        ("endpoint", 5),
        ("url", {"host": "h"}),
    ],
)
def test_auth_data_wrong_type(field: str, value: Any) -> None:
    errors = auth_errors({**GOOD_AUTH, field: value})
    assert list(errors) == [field]
    assert errors[field].startswith("expected ")


def test_auth_data_wrong_types_all_reported() -> None:
    errors = auth_errors({**GOOD_AUTH, "reqnum": "7", "url": 1, "cost": False})
    assert sorted(errors) == ["cost", "reqnum", "url"]
    assert "integer" in errors["reqnum"] and "string" in errors["url"]


@pytest.mark.parametrize("msg", [[], "auth", 7, None, [GOOD_AUTH]])
def test_auth_data_not_an_object(msg: Any) -> None:
    assert list(auth_errors(msg)) == ["__all__"]


@dataclasses.dataclass
class ImagePayload(ApiPayload):
    """A payload with the field types a worker author reaches for."""

    prompt: str
    steps: int
    guidance: float
    negative_prompt: Optional[str] = None  # noqa: UP045 - typing.Optional, spelled the old way
    seed: int | None = None
    size: Literal["512x512", "1024x1024"] = "512x512"
    loras: list[str] = dataclasses.field(default_factory=list[str])
    weights: dict[str, float] = dataclasses.field(default_factory=dict[str, float])
    options: dict[str, Any] = dataclasses.field(default_factory=dict[str, Any])

    @classmethod
    def for_test(cls) -> ImagePayload:
        return cls(prompt="a cat", steps=20, guidance=7.5)

    def generate_payload_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def count_workload(self) -> float:
        return float(self.steps)


def payload_errors(msg: Any) -> dict[str, Any]:
    with pytest.raises(JsonDataException) as info:
        ImagePayload.from_json_msg(msg)
    return info.value.message


def test_dataclass_payload_full() -> None:
    msg = {
        "prompt": "a cat",
        "steps": 30,
        "guidance": 7,
        "negative_prompt": None,
        "seed": 42,
        "size": "1024x1024",
        "loras": ["a", "b"],
        "weights": {"a": 0.5, "b": 1},
        "options": {"anything": [1, {"x": None}]},
        "unknown": "ignored",
    }
    payload = ImagePayload.from_json_msg(msg)
    assert payload.guidance == 7.0 and type(payload.guidance) is float  # int widened to float
    assert payload.size == "1024x1024" and payload.loras == ["a", "b"] and payload.seed == 42
    assert payload.weights == {"a": 0.5, "b": 1}
    assert payload.options == {"anything": [1, {"x": None}]}


def test_dataclass_payload_defaults() -> None:
    payload = ImagePayload.from_json_msg({"prompt": "p", "steps": 1, "guidance": 1.5})
    assert payload == ImagePayload(prompt="p", steps=1, guidance=1.5)
    assert payload.loras == [] and payload.weights == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", None),
        ("prompt", 5),
        ("steps", True),
        ("steps", "30"),
        ("steps", 30.5),
        ("guidance", True),
        ("guidance", "7.5"),
        ("guidance", float("nan")),
        ("guidance", float("inf")),
        ("negative_prompt", 0),
        ("seed", False),
        ("seed", "42"),
        ("size", "256x256"),
        ("size", 512),
        ("loras", "a"),
        ("loras", ["a", 1]),
        ("loras", {"a": "b"}),
        ("weights", {"a": "heavy"}),
        ("weights", {"a": True}),
        ("weights", [["a", 1.0]]),
        ("options", []),
    ],
)
def test_dataclass_payload_wrong_type(field: str, value: Any) -> None:
    msg: dict[str, Any] = {"prompt": "p", "steps": 1, "guidance": 1.5, field: value}
    errors = payload_errors(msg)
    assert list(errors) == [field]
    assert isinstance(errors[field], str) and errors[field]


def test_dataclass_payload_reports_every_bad_field() -> None:
    errors = payload_errors({"steps": "many", "size": "huge", "unknown": 1})
    assert errors["prompt"] == "missing parameter"
    assert errors["guidance"] == "missing parameter"
    assert sorted(errors) == ["guidance", "prompt", "size", "steps"]


def test_dataclass_payload_literal_is_type_exact() -> None:
    @dataclasses.dataclass
    class Flags:
        mode: Literal[1, "fast"]

    assert from_json_fields(Flags, {"mode": 1}).mode == 1
    assert from_json_fields(Flags, {"mode": "fast"}).mode == "fast"
    for bad in (True, 1.0, "1"):  # True == 1 and 1.0 == 1 in Python; not the same JSON value
        with pytest.raises(JsonDataException):
            from_json_fields(Flags, {"mode": bad})


def test_dataclass_payload_not_an_object() -> None:
    bad: list[Any] = [[], "prompt", 3, None]
    for msg in bad:
        assert list(payload_errors(msg)) == ["__all__"]


def test_from_json_fields_needs_a_dataclass() -> None:
    class NotADataclass:
        pass

    with pytest.raises(TypeError):
        from_json_fields(NotADataclass, {})
