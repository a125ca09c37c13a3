"""`tether cloud ...` and `tether console` as a new user meets them (findings
M5, M6, M8, L2, L4, L7, L10 and L15 of a walkthrough of the README and docs):
through the real command line (cloud/cli.py, in process or as a process) on
real data directories."""

import argparse
import json
import os
import socket
import subprocess
import sys

import pytest

from cloud import firmware
from cloud.cli import build_parser, main
from cloud.service import Cloud

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TETHER = [sys.executable, "-m", "cloud.cli"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run(*argv, timeout=60):
    return subprocess.run(TETHER + [str(a) for a in argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def make_cloud(path):
    """A cloud's data directory, as `tether cloud serve` leaves it."""
    Cloud(str(path)).registry.close()
    return str(path)


# ---------------------------------------------------------------- M5: a port in use

@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("option", ["--port", "--prov-port", "--fw-http-port"])
def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path, busy_port, option):
    ports = {"--port": 0, "--prov-port": 0, "--fw-http-port": 0, option: busy_port}
    argv = [x for kv in ports.items() for x in kv]
    result = run("cloud", "serve", "--data", tmp_path / "cloud", *argv)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "port %d (%s) is already in use" % (busy_port, option) in result.stderr
    assert not (tmp_path / "cloud").exists()              # refused before anything was made


def test_serve_refuses_two_endpoints_on_one_port(tmp_path):
    result = run("cloud", "serve", "--data", tmp_path / "cloud", "--port", 18999, "--prov-port", 18999)
    assert result.returncode == 2 and "--port and --prov-port are both 18999" in result.stderr


def test_serve_losing_a_port_after_the_check_still_says_one_line(tmp_path, busy_port):
    """The port is taken between the check and the bind (a race): amqtt's
    own traceback is not shown, the one line names the option."""
    code = ("import sys; from cloud import serve, cli; serve.check_ports = lambda *a: None; "
            "sys.exit(cli.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "cloud", "serve", "--data", str(tmp_path / "cloud"),
                             "--port", str(busy_port), "--prov-port", "0", "--fw-http-port", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "tether cloud serve: port %d (--port) is already in use" % busy_port in result.stderr


# ---------------------------------------------------------------- M6: allow --file

def test_allow_file_without_a_header_row(tmp_path, capsys):
    data = make_cloud(tmp_path / "cloud")
    assert cli(capsys, "cloud", "claim", "line-3", "--quota", 5, "--data", data)[0] == 0
    hwids = tmp_path / "hwids.csv"
    hwids.write_text("ci-hw-00000,acme,pump-0,site-4\nci-hw-00001,acme,pump-1,site-4\n")
    code, out, err = cli(capsys, "cloud", "allow", "--batch", "line-3", "--file", hwids, "--data", data)
    assert code == 0 and "allowlisted 2 hardware id(s)" in out, err
    code, out, _ = cli(capsys, "cloud", "audit", "--action", "allowlist", "--json", "--data", data)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["subject"] for r in rows] == ["acme/pump-0", "acme/pump-1"]
    assert "hwid ci-hw-00000 batch line-3 site site-4" in rows[0]["detail"]


def test_allow_file_with_a_header_row_still_works(tmp_path, capsys):
    data = make_cloud(tmp_path / "cloud")
    cli(capsys, "cloud", "claim", "b", "--quota", 5, "--data", data)
    hwids = tmp_path / "hwids.csv"
    hwids.write_text("hwid,tenant,device,site\nhw-1,acme,pump-1,lab\n")
    code, out, _ = cli(capsys, "cloud", "allow", "--batch", "b", "--file", hwids, "--data", data)
    assert code == 0 and "allowlisted 1 hardware id(s)" in out


def test_allow_file_refuses_a_malformed_line_by_number_and_writes_nothing(tmp_path, capsys):
    data = make_cloud(tmp_path / "cloud")
    cli(capsys, "cloud", "claim", "b", "--quota", 5, "--data", data)
    hwids = tmp_path / "hwids.csv"
    for text, line in (("hw-1,acme,pump-1,lab\nhw-2,acme,pump-2,lab\nhw-3\n", 3),
                       ("hw-1,acme,pump-1,lab\nhw 2,acme,pump-2,lab\n", 2),
                       ("hw-1,acme,pump-1,lab,extra\n", 1)):
        hwids.write_text(text)
        code, _, err = cli(capsys, "cloud", "allow", "--batch", "b", "--file", hwids, "--data", data)
        assert code == 2 and "%s line %d:" % (hwids, line) in err, err
    assert cli(capsys, "cloud", "audit", "--action", "allowlist", "--data", data)[1] == ""


def test_allow_help_gives_the_file_format():
    text = " ".join(run("cloud", "allow", "--help").stdout.split())
    assert "one a line: hwid,tenant,device,site" in text and "header" in text


# ---------------------------------------------------------------- M8: --data without a cloud

NO_CLOUD_COMMANDS = [
    ["cloud", "support", "grant", "--technician", "a", "--tech-key", "{pub}", "--device", "acme/d1",
     "--role", "viewer", "--reason", "r", "--approved-by", "b", "--out", "{tmp}/a.grant"],
    ["cloud", "support", "pubkey", "--out", "{tmp}/s.pub"],
    ["cloud", "support", "review"],
    ["cloud", "support", "findings"],
    ["cloud", "support", "revocations", "--out", "{tmp}/rl"],
    ["cloud", "support", "revoke", "0" * 32, "--reason", "r"],
    ["cloud", "support", "verify-log", "--device", "acme/d1", "--log", "{pub}"],
    ["cloud", "releases", "trust", "--root", "{pub}", "--hw-class", "sim-v1"],
    ["cloud", "releases", "list"],
    ["cloud", "rollout", "status"],
    ["cloud", "rollout", "start", "--release", "r", "--canary", "1", "--reason", "r"],
    ["cloud", "rollout", "kill", "--reason", "r"],
    ["cloud", "window", "list"],
    ["cloud", "window", "set", "acme", "--start", "22:00", "--end", "02:00"],
    ["cloud", "claim", "b", "--quota", "1"],
    ["cloud", "allow", "hw-1", "--batch", "b", "--tenant", "acme"],
    ["cloud", "approve", "hw-1", "--reason", "r"],
    ["cloud", "enrollments"],
    ["cloud", "audit"],
    ["cloud", "revoke", "acme/d1", "--reason", "r"],
]


@pytest.mark.parametrize("argv", NO_CLOUD_COMMANDS, ids=lambda a: " ".join(a[1:3]))
def test_every_command_but_serve_refuses_a_data_directory_without_a_cloud(tmp_path, capsys, argv):
    _, pub, _ = firmware.write_keypair(str(tmp_path), "alice")
    nowhere = tmp_path / "nd"
    nowhere.mkdir()                                   # an existing directory with no cloud in it
    argv = [a.format(pub=pub, tmp=tmp_path) for a in argv]
    code, out, err = cli(capsys, *argv, "--data", nowhere)
    assert code == 2 and "no cloud data in %s (give --data)" % nowhere in err, (out, err)
    assert os.listdir(nowhere) == []                  # no new cloud, no new support key
    assert not (tmp_path / "a.grant").exists()


def test_the_default_data_directory_is_not_made_either(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "cloud", "support", "pubkey", "--out", "s.pub")
    assert code == 2 and "no cloud data in tether-cloud" in err
    assert not (tmp_path / "tether-cloud").exists() and not (tmp_path / "s.pub").exists()


def test_the_commands_work_on_a_cloud(tmp_path, capsys):
    data = make_cloud(tmp_path / "cloud")
    code, out, _ = cli(capsys, "cloud", "support", "pubkey", "--out", tmp_path / "s.pub", "--data", data)
    assert code == 0 and "written to" in out
    assert cli(capsys, "cloud", "rollout", "status", "--data", data)[1].strip() == "no rollouts"


# ---------------------------------------------------------------- L2: help

def _parsers(parser, path=("tether",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_cloud_and_console_options_all_explain_themselves():
    for path, parser in _parsers(build_parser()):
        if path[1:2] not in (("cloud",), ("console",)):
            continue
        assert parser.description, path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue                              # its commands are listed with their help
            assert action.help, (path, action.option_strings or action.dest)
            if "--data" in action.option_strings:
                assert "(default ./tether-cloud)" in action.help, path


def help_text(*argv):
    return " ".join(run(*argv, "--help").stdout.split())      # as read, not as wrapped


def test_the_help_texts_the_walkthrough_missed():
    serve = help_text("cloud", "serve")
    assert "--host HOST" in serve and "(default 127.0.0.1" in serve.split("--host HOST")[2]
    assert "(default embedded)" in serve and "(default 2)" in serve
    assert "List each claim batch" in help_text("cloud", "enrollments")
    allow = help_text("cloud", "allow")
    assert "claim batch" in allow.split("--batch BATCH")[2] and "tenant" in allow.split("--tenant TENANT")[2]
    console = help_text("console")
    assert "default 115200" in console and "default 10" in console
    assert "mon,tue,wed,thu,fri,sat,sun (default: every day)" in help_text("cloud", "window", "set")


# ---------------------------------------------------------------- L4: error suffixes

def test_console_and_grant_errors_without_a_misleading_code(tmp_path, capsys):
    result = run("console", "loop://", "--grant", tmp_path / "nope.grant", "--key", tmp_path / "k")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("cannot read grant %s: No such file or directory" % (tmp_path / "nope.grant"))
    data = make_cloud(tmp_path / "cloud")
    code, _, err = cli(capsys, "cloud", "support", "grant", "--technician", "a", "--tech-key", tmp_path / "nope.pub",
                       "--device", "acme/d1", "--role", "viewer", "--reason", "r", "--approved-by", "b",
                       "--out", tmp_path / "a.grant", "--data", data)
    assert code == 2 and err.strip().endswith("No such file or directory"), err


def test_console_timeout_is_said_once():
    from cloud.console_tool import PortError, Session, describe

    class Silent:
        timeout = 0.5

        def readline(self):
            return b""
    with pytest.raises(PortError) as e:
        Session(Silent(), b"", None).reply()
    assert describe(e.value) == "the device did not answer within 0.5 s (timeout)"


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_console_timeout_must_be_positive(tmp_path, value):
    result = run("console", "loop://", "--grant", tmp_path / "g", "--key", tmp_path / "k", "--timeout", value)
    assert result.returncode == 2 and "argument --timeout: must be more than 0" in result.stderr


# ---------------------------------------------------------------- L7: typos

def test_revoke_refuses_an_identity_the_cloud_never_knew(tmp_path, capsys):
    data = make_cloud(tmp_path / "cloud")
    code, out, err = cli(capsys, "cloud", "revoke", "nosuch/dev", "--reason", "stolen", "--wait", 0, "--data", data)
    assert code == 2 and "nosuch/dev was never issued nor allowlisted" in err and "revoked" not in out
    assert cli(capsys, "cloud", "audit", "--action", "revoke", "--data", data)[1] == ""
    cloud = Cloud(data)                              # issued: revoked (not enforced: no cloud running)
    cloud.issue_device("acme", "dev-1")
    cloud.registry.close()
    code, out, _ = cli(capsys, "cloud", "revoke", "acme/dev-1", "--reason", "stolen", "--wait", 0, "--data", data)
    assert code == 1 and out.startswith("revoked acme/dev-1")
    cli(capsys, "cloud", "claim", "b", "--quota", 1, "--data", data)
    cli(capsys, "cloud", "allow", "hw-1", "--batch", "b", "--tenant", "acme", "--device", "pump-1", "--data", data)
    code, out, _ = cli(capsys, "cloud", "revoke", "acme/pump-1", "--reason", "lost before enrolling",
                       "--wait", 0, "--data", data)        # allowlisted, not yet enrolled: may be revoked
    assert code == 1 and out.startswith("revoked acme/pump-1")


def test_allow_refuses_a_batch_that_does_not_exist(tmp_path, capsys):
    data = make_cloud(tmp_path / "cloud")
    code, out, err = cli(capsys, "cloud", "allow", "hw-9", "--batch", "nosuch", "--tenant", "acme", "--data", data)
    assert code == 2 and "no claim batch 'nosuch'" in err and "tether cloud claim nosuch" in err
    assert cli(capsys, "cloud", "audit", "--action", "allowlist", "--data", data)[1] == ""


def test_allow_a_bad_hardware_id_is_a_usage_error_not_a_traceback(tmp_path, capsys):
    data = make_cloud(tmp_path / "cloud")
    cli(capsys, "cloud", "claim", "b", "--quota", 1, "--data", data)
    code, _, err = cli(capsys, "cloud", "allow", "hw 9", "--batch", "b", "--tenant", "acme", "--data", data)
    assert code == 2 and "hardware id may only use" in err


# ---------------------------------------------------------------- L10: bare groups, --version

@pytest.mark.parametrize("group", [[], ["cloud"], ["fw"], ["sim"], ["agent"], ["cloud", "support"],
                                   ["cloud", "rollout"], ["cloud", "releases"], ["cloud", "window"]],
                         ids=lambda g: " ".join(g) or "tether")
def test_a_bare_group_prints_its_help_and_exits_2(group):
    result = run(*group)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: tether%s" % "".join(" " + g for g in group)), result.stderr


def test_version_and_the_summary_lists_every_group():
    from importlib import metadata
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == "tether " + metadata.version("tether")
    summary = run("--help").stdout
    for needle in ("tether console", "tether cloud support", "releases | rollout | window"):
        assert needle in summary, needle


# ---------------------------------------------------------------- L15: say what was done

def test_empty_listings_and_written_files_are_said(tmp_path, capsys):
    data = make_cloud(tmp_path / "cloud")
    assert cli(capsys, "cloud", "support", "findings", "--data", data)[1].strip() == "no findings"
    assert cli(capsys, "cloud", "support", "findings", "--json", "--data", data)[1] == ""
    assert cli(capsys, "cloud", "releases", "list", "--data", data)[1].strip() == "no releases"
    assert cli(capsys, "cloud", "releases", "list", "--json", "--data", data)[1].strip() == "[]"
    rl = tmp_path / "rl.cose"
    code, out, _ = cli(capsys, "cloud", "support", "revocations", "--out", rl, "--data", data)
    assert code == 0 and "written to %s" % rl in out and rl.exists()
    _, pub, _ = firmware.write_keypair(str(tmp_path), "alice")
    _, out, _ = cli(capsys, "cloud", "support", "grant", "--technician", "alice", "--tech-key", pub, "--device", "acme/d1",
                    "--role", "viewer", "--reason", "r", "--approved-by", "bob", "--requested-by", "carol",
                    "--out", tmp_path / "a.grant", "--data", data)
    gid = out.split()[1]
    rl2 = tmp_path / "rl2.cose"
    code, out, _ = cli(capsys, "cloud", "support", "revoke", gid, "--reason", "done", "--out", rl2, "--data", data)
    assert code == 0 and out.startswith("revoked " + gid) and "written to %s" % rl2 in out and rl2.exists()


# ---------------------------------------------------------------- L6: private keys where public ones belong

def test_a_private_key_where_a_public_one_belongs_is_refused_everywhere(tmp_path, capsys):
    """releases trust --root and support grant --tech-key took a private key
    (and used its public half); every command that wants a public key now
    refuses one, naming the .pub to give instead."""
    data = make_cloud(tmp_path / "cloud")
    key_path = firmware.write_keypair(str(tmp_path / "keys"), "root")[0]
    code, out, err = cli(capsys, "cloud", "releases", "trust", "--root", key_path, "--k", "1",
                         "--hw-class", "sim-v1", "--data", data)
    assert code == 2 and "is a private key" in out + err and "root.pub" in out + err
    code, out, err = cli(capsys, "cloud", "support", "grant", "--technician", "alice", "--tech-key", key_path,
                         "--device", "acme/d1", "--role", "viewer", "--hours", "1", "--reason", "r",
                         "--approved-by", "bob", "--requested-by", "carol", "--out", tmp_path / "g", "--data", data)
    assert code == 2 and "is a private key" in out + err
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------- one identity, one board

def test_an_identity_is_allowlisted_for_one_board_unless_it_is_replaced(tmp_path, capsys):
    """A second walkthrough: allow accepted acme/pump-1 for hw-0091 while
    hw-0001 had it, and hw-0091's enrollment retired the working board's
    certificate. Refused now; --replace is the board swap, audited."""
    data = make_cloud(tmp_path / "cloud")
    assert cli(capsys, "cloud", "claim", "b1", "--quota", "5", "--data", data)[0] == 0
    allow = ["cloud", "allow", "--batch", "b1", "--tenant", "acme", "--device", "pump-1", "--data", data]
    assert cli(capsys, *allow[:2], "hw-0001", *allow[2:])[0] == 0
    code, _, err = cli(capsys, *allow[:2], "hw-0091", *allow[2:])
    assert code == 2 and "acme/pump-1 is already allowlisted for hardware id hw-0001" in err
    csv = tmp_path / "hw.csv"
    csv.write_text("hw-0101,acme,pump-9,s\nhw-0102,acme,pump-9,s\n")
    code, _, err = cli(capsys, "cloud", "allow", "--batch", "b1", "--file", csv, "--data", data)
    assert code == 2 and "acme/pump-9 is given for two hardware ids" in err
    assert cli(capsys, *allow[:2], "hw-0091", *allow[2:], "--replace")[0] == 0
    _, out, _ = cli(capsys, "cloud", "audit", "--action", "allowlist_replaced", "--data", data)
    assert "acme/pump-1" in out and "hw-0001 taken off for hw-0091" in out


def test_allow_with_a_hardware_id_and_a_file_is_refused_not_half_done(tmp_path, capsys):
    """The hardware id given beside --file was silently dropped (a second walkthrough)."""
    data = make_cloud(tmp_path / "cloud")
    assert cli(capsys, "cloud", "claim", "b1", "--quota", "5", "--data", data)[0] == 0
    csv = tmp_path / "hw.csv"
    csv.write_text("hw-0101,acme,pump-1,s\n")
    code, _, err = cli(capsys, "cloud", "allow", "hw-0200", "--tenant", "acme", "--batch", "b1", "--file", csv,
                       "--data", data)
    assert code == 2 and "not both" in err
    assert cli(capsys, "cloud", "audit", "--action", "allowlist", "--data", data)[1] == ""
