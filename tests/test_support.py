"""`tether cloud support`: grants only with a distinct approver (recorded),
revocation, access review, and audit-log verification with exit codes,
through tether's own command line (cloud/cli.py)."""

import json

import pytest

from agent import auditlog, grant
from agent.manifest import fingerprint
from cloud import firmware
from cloud.cli import main
from cloud.service import Cloud
from simulator.console_drill import drop_last_records, edit_record


def cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_grant_review_revoke_through_the_cli(tmp_path, capsys):
    data = str(tmp_path / "cloud")
    Cloud(data).registry.close()        # the commands refuse a --data with no cloud (M8 of a walkthrough)
    _, pub, _ = firmware.write_keypair(str(tmp_path), "alice")
    base = ["cloud", "support", "grant", "--data", data, "--technician", "alice", "--tech-key", pub,
            "--device", "acme/d1", "--device", "acme/d2", "--role", "technician", "--hours", "2",
            "--reason", "ticket 42", "--out", str(tmp_path / "a.grant")]
    code, _, err = cli(capsys, *base, "--approved-by", "carol", "--requested-by", "carol")
    assert code == 2 and "(self_approval)" in err
    with pytest.raises(SystemExit) as e:               # argparse: --approved-by is required
        main(base + ["--requested-by", "dave"])
    assert e.value.code == 2 and "--approved-by" in capsys.readouterr().err
    code, out, _ = cli(capsys, *base, "--approved-by", "carol", "--requested-by", "dave")
    assert code == 0
    gid = out.split()[1]
    message = open(str(tmp_path / "a.grant"), "rb").read()
    assert cli(capsys, "cloud", "support", "pubkey", "--data", data, "--out", str(tmp_path / "s.pub"))[0] == 0
    point = open(str(tmp_path / "s.pub"), "rb").read()
    keys = {fingerprint(point): point}          # what a device pins, from the exported key
    g = grant.start(message, keys)[0]
    assert (g.technician, g.role, g.devices) == ("alice", "technician", ["acme/d1", "acme/d2"])

    code, out, _ = cli(capsys, "cloud", "support", "review", "--data", data, "--json")
    row = json.loads(out)
    assert (row["gid"], row["state"], row["requested_by"], row["approved_by"]) == (gid, "active", "dave", "carol")
    code, out, _ = cli(capsys, "cloud", "support", "revoke", gid, "--data", data, "--by", "carol",
                       "--reason", "done", "--out", str(tmp_path / "rl.cose"))
    assert code == 0 and out.startswith("revoked")
    iat, revoked = grant.verify_revocations(open(str(tmp_path / "rl.cose"), "rb").read(), keys)
    assert revoked == [bytes.fromhex(gid)]
    code, out, _ = cli(capsys, "cloud", "support", "review", "--data", data)
    assert "revoked" in out and "dave/carol" in out
    assert cli(capsys, "cloud", "support", "review", "--data", data, "--current", "--json")[1] == ""
    assert cli(capsys, "cloud", "support", "revoke", "0" * 32, "--data", data, "--reason", "x")[0] == 2


def test_verify_log_exit_codes_and_checkpoints(tmp_path, capsys):
    data = str(tmp_path / "cloud")
    Cloud(data).registry.close()        # the commands refuse a --data with no cloud (M8 of a walkthrough)
    chain = auditlog.AuditChain("acme/d1")
    log = b"".join(chain.record(1_800_000_000, "command", {"i": i}) for i in range(5))
    path = str(tmp_path / "audit.log")
    firmware.write_file(path, log)
    code, out, _ = cli(capsys, "cloud", "support", "verify-log", "--data", data, "--device", "acme/d1", "--log", path)
    assert code == 0 and "chain verified" in out
    firmware.write_file(path, edit_record(log, 1))
    code, out, _ = cli(capsys, "cloud", "support", "verify-log", "--data", data, "--device", "acme/d1", "--log", path)
    assert code == 1 and "edit at seq 1" in out and "TAMPERED" in out
    firmware.write_file(path, drop_last_records(log, 1))
    code, out, _ = cli(capsys, "cloud", "support", "verify-log", "--data", data, "--device", "acme/d1",
                       "--log", path, "--json")
    report = json.loads(out)
    assert code == 1 and report["tamper"] and report["problems"][0][0] == "truncated"
    assert cli(capsys, "cloud", "support", "verify-log", "--data", data, "--device", "acme/d1",
               "--log", str(tmp_path / "none"))[0] == 2


def test_grants_and_log_checks_name_a_device_with_its_tenant(tmp_path, capsys):
    """A console grant for device pump-1 opened an admin session on every
    tenant's pump-1 (a new-user walkthrough): a device is named by its
    identity, a site as tenant/site, and a bare name is refused."""
    data = str(tmp_path / "cloud")
    Cloud(data).registry.close()
    _, pub, _ = firmware.write_keypair(str(tmp_path), "alice")
    base = ["cloud", "support", "grant", "--data", data, "--technician", "alice", "--tech-key", pub,
            "--role", "admin", "--reason", "r", "--approved-by", "bob", "--requested-by", "carol",
            "--out", str(tmp_path / "a.grant")]
    for scope in (["--device", "pump-1"], ["--site", "plant-2"], ["--device", "acme/pump-1/x"]):
        code, _, err = cli(capsys, *base, *scope)
        assert code == 2 and "must be tenant/" in err, err
        assert not (tmp_path / "a.grant").exists()
    assert cli(capsys, *base, "--device", "acme/pump-1", "--site", "acme/plant-2")[0] == 0
    code, _, err = cli(capsys, "cloud", "support", "verify-log", "--data", data, "--device", "pump-1",
                       "--log", pub)
    assert code == 2 and "must be tenant/device" in err


def test_two_different_lists_in_one_second_never_share_an_iat(tmp_path):
    """A device refuses a list older than the applied one, or as old with
    other ids: the desk signs each change with a later iat, even within a
    second, and an unchanged list keeps its iat."""
    from cloud.support import SupportDesk
    desk = SupportDesk(str(tmp_path / "desk"), clock_s=lambda: 1_800_000_000)
    try:
        keys = desk.keys()
        first = grant.verify_revocations(desk.revocation_list(), keys)
        assert grant.verify_revocations(desk.revocation_list(), keys) == first     # unchanged: same iat
        point = desk.public_key
        gids = [desk.grant("t%d" % i, point, "viewer", ["d1"], requested_by="a", approved_by="b",
                           reason="r")[0] for i in range(2)]
        iats = []
        for gid in gids:
            desk.revoke(gid, "b", "r")
            iats.append(grant.verify_revocations(desk.revocation_list(), keys)[0])
        assert iats == [first[0] + 1, first[0] + 2]
        earlier = first[0] + 1
        with_both = grant.verify_revocations(desk.revocation_list(), keys)
        assert with_both[0] == earlier + 1 and len(with_both[1]) == 2
    finally:
        desk.close()


def test_a_grant_for_one_tenants_device_opens_nothing_on_anothers_of_the_same_name(tmp_path):
    """acme/pump-1's admin grant on beta/pump-1: refused (wrong_device) and recorded."""
    from cloud.console_tool import Refused
    from cloud.support import SupportDesk
    from simulator.console_drill import T0_S, SimConsoleDevice, Technician
    desk = SupportDesk(str(tmp_path / "desk"), clock_s=lambda: T0_S)
    try:
        tech = Technician("alice")
        message = desk.grant(tech.name, tech.point, "admin", ["acme/pump-1"], requested_by="alice",
                             approved_by="bob", reason="r")[1]
        other = SimConsoleDevice("beta/pump-1", desk.keys(), 1)
        with pytest.raises(Refused) as e:
            tech.session(other, message).open()
        assert e.value.code == "wrong_device"
        assert auditlog.records(other.audit_log())[-1][4]["code"] == "wrong_device"
        assert tech.session(SimConsoleDevice("acme/pump-1", desk.keys(), 2), message).open()[0] == "admin"
    finally:
        desk.close()
