"""Support-access grants (agent/grant.py), signed by the cloud's real key
with `cryptography`, verified by the device's portable code: every policy
check has its refusal code, and hostile bytes only ever raise GrantError."""

import pytest
from hypothesis import given, settings, strategies as st

from agent import cbor, grant
from cloud import firmware
from cloud.support import SupportDesk, SupportError, cose_key, sign_grant

NOW = 1_800_000_000
SUPPORT = firmware.generate_key()
KEYS = {firmware.kid_of(SUPPORT): firmware.public_bytes(SUPPORT)}
TECH = firmware.public_bytes(firmware.generate_key())
GID = bytes(range(16))


def claims(**changes):
    c = {1: grant.ISSUER, 2: "alice", 4: NOW + 3600, 5: NOW - 60, 6: NOW - 60, 7: GID,
         8: {1: cose_key(TECH)}, "role": "technician", "devices": ["d1", "d2"]}
    for key, value in changes.items():
        label = {"iss": 1, "sub": 2, "exp": 4, "nbf": 5, "iat": 6, "cti": 7, "cnf": 8}.get(key, key)
        if value is None:
            c.pop(label, None)
        else:
            c[label] = value
    return c


def signed(**changes):
    return sign_grant(claims(**changes), SUPPORT)


def code_of(message, device="d1", site=None, now=NOW, floor=0, revoked=(), keys=KEYS):
    with pytest.raises(grant.GrantError) as e:
        grant.verify(message, keys, device, site, now, floor, revoked)
    return e.value.code


GOOD = signed()


def test_a_good_grant_verifies_with_every_field():
    g = grant.verify(GOOD, KEYS, "d2", None, NOW)
    assert (g.gid, g.technician, g.role, g.devices, g.site) == (GID, "alice", "technician", ["d1", "d2"], None)
    assert (g.nbf, g.exp, g.key) == (NOW - 60, NOW + 3600, TECH)


def test_time_window():
    assert code_of(GOOD, now=NOW + 3600) == "expired"
    assert code_of(GOOD, now=NOW - 61) == "not_yet_valid"
    assert grant.verify(GOOD, KEYS, "d1", None, NOW + 3599).role == "technician"


def test_trusted_floor_beats_a_clock_set_back():
    assert code_of(GOOD, now=NOW, floor=NOW + 3600) == "expired"
    assert grant.raise_floor(NOW - 100, grant.verify(GOOD, KEYS, "d1", None, NOW)) == NOW - 60


def test_scope_devices_and_site():
    assert code_of(GOOD, device="d3") == "wrong_device"
    site = signed(devices=[], site="plant-7")
    assert grant.verify(site, KEYS, "d9", "plant-7", NOW).site == "plant-7"
    assert code_of(site, device="d9", site="plant-8") == "wrong_device"
    assert code_of(site, device="d9", site=None) == "wrong_device"
    assert code_of(signed(devices=[])) == "malformed"       # names nothing


def test_revoked():
    assert code_of(GOOD, revoked=[b"x" * 16, GID]) == "revoked"


def test_forgeries():
    other = firmware.generate_key()
    assert code_of(sign_grant(claims(), other)) == "unknown_kid"
    # another key claiming the pinned kid
    impostor = sign_grant(claims(), other)
    impostor = impostor.replace(firmware.kid_of(other), firmware.kid_of(SUPPORT))
    assert code_of(impostor) == "bad_signature"
    from simulator.console_drill import edit_grant
    assert code_of(edit_grant(GOOD, role="admin")) == "bad_signature"
    assert code_of(edit_grant(GOOD, devices=["d1", "d2", "d3"]), device="d3") == "bad_signature"
    # a firmware signature (other external_aad) is not a grant
    assert code_of(firmware.sign1(cbor.dumps(claims()), SUPPORT, b"")) == "bad_signature"


@pytest.mark.parametrize("changes,code", [
    ({"role": "root"}, "bad_role"), ({"role": None}, "bad_role"),
    ({"iss": "someone"}, "malformed"), ({"cti": b"short"}, "malformed"),
    ({"sub": "has space"}, "malformed"), ({"sub": ""}, "malformed"),
    ({"exp": NOW - 60}, "malformed"), ({"exp": NOW - 60 + grant.GRANT_SECONDS_MAX + 1}, "malformed"),
    ({"nbf": -1}, "malformed"), ({"iat": 1.5}, "malformed"), ({"cnf": None}, "malformed"),
    ({"cnf": {1: {1: 2, -1: 1, -2: b"\0" * 32, -3: b"\0" * 32}}}, "malformed"),   # off the curve
    ({"devices": ["d%d" % i for i in range(grant.DEVICES_MAX + 1)]}, "malformed"),
])
def test_malformed_claims_have_their_codes(changes, code):
    assert code_of(signed(**changes)) == code


def test_oversized_and_non_bytes():
    assert code_of(b"\x00" * (grant.GRANT_BYTES_MAX + 1)) == "malformed"
    assert code_of("text") == "malformed"


def test_revocation_lists():
    def rl(iat, revoked, key=SUPPORT):
        return firmware.sign1(cbor.dumps({6: iat, "revoked": revoked}), key, grant.REVOCATIONS_AAD)
    assert grant.verify_revocations(rl(NOW, [GID]), KEYS) == (NOW, [GID])
    for message, code in ((rl(NOW - 1, [GID]), "stale"), (rl(NOW, [GID], firmware.generate_key()), "unknown_kid"),
                          (rl(NOW, [b"x"]), "malformed"), (GOOD, "bad_signature")):
        with pytest.raises(grant.GrantError) as e:
            grant.verify_revocations(message, KEYS, NOW)
        assert e.value.code == code
    # As old as the list applied: only the same ids again (a re-send); other ids are a replay.
    other = GID[:-1] + bytes([GID[-1] ^ 1])
    assert grant.verify_revocations(rl(NOW, [GID]), KEYS, NOW, [GID]) == (NOW, [GID])
    with pytest.raises(grant.GrantError) as e:
        grant.verify_revocations(rl(NOW, [GID]), KEYS, NOW, [GID, other])
    assert e.value.code == "stale"


# ---------------------------------------------------------------- fuzz

@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_hostile_bytes_raise_only_grant_error(data):
    with pytest.raises(grant.GrantError):
        grant.start(data, KEYS)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_truncated_or_mutated_grants_never_crash(data):
    message = bytearray(GOOD)
    if data.draw(st.booleans()):
        message = message[:data.draw(st.integers(0, len(message) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(message) - 1))
            message[i] = data.draw(st.integers(0, 255))
    try:
        g, verifier = grant.start(bytes(message), KEYS)
    except grant.GrantError:
        return
    verifier.step(256)     # parsed: the signature decides
    if verifier.result():  # only if what it covers is untouched (a tag or unprotected byte changed)
        from agent import cose
        assert cose.decode1(bytes(message))[3] == cose.decode1(GOOD)[3]
        assert cose.decode1(bytes(message))[0] == cose.decode1(GOOD)[0]


VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2 ** 64, 2 ** 64),
                                st.text(max_size=10), st.binary(max_size=40)),
                      lambda inner: st.one_of(st.lists(inner, max_size=4),
                                              st.dictionaries(st.one_of(st.integers(-4, 9), st.text(max_size=8)),
                                                              inner, max_size=4)), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["iss", "sub", "exp", "nbf", "iat", "cti", "cnf", "role",
                                        "devices", "site"]), VALUES, max_size=4))
def test_any_claim_values_parse_or_raise_grant_error(changes):
    try:
        payload = cbor.dumps(claims(**changes))
    except Exception:
        return
    try:
        g = grant.parse(payload)
    except grant.GrantError:
        return
    assert g.role in grant.ROLE_RANK and len(g.key) == 65


# ---------------------------------------------------------------- issuing

def test_desk_refuses_grants_without_distinct_approval(tmp_path):
    desk = SupportDesk(str(tmp_path), clock_s=lambda: NOW)
    base = dict(technician="alice", tech_key=TECH, role="viewer", devices=["d1"], reason="r")
    for requested, approved, code in (("bob", "bob", "self_approval"), ("bob", "Bob ", "self_approval"),
                                      ("bob", "alice", "self_approval"), ("bob", None, "missing_approved_by"),
                                      ("bob", "", "missing_approved_by")):
        with pytest.raises(SupportError) as e:
            desk.grant(requested_by=requested, approved_by=approved, **base)
        assert e.value.code == code
    with pytest.raises(SupportError) as e:
        desk.grant(requested_by="bob", approved_by="carol", hours=200, **base)
    assert e.value.code == "bad_window"
    gid, message = desk.grant(requested_by="bob", approved_by="carol", **base)
    assert grant.verify(message, desk.keys(), "d1", None, NOW).gid.hex() == gid
    [row] = desk.review()
    assert (row["requested_by"], row["approved_by"], row["state"]) == ("bob", "carol", "active")
    desk.close()
