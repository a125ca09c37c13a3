"""`tether console PORT --grant FILE --key FILE`: the field technician's tool.

PORT is anything pyserial opens: /dev/ttyUSB0, /dev/pts/N, rfc2217://HOST:PORT,
socket://HOST:PORT, loop://. The tool sends the grant, answers the device's
challenge by signing it with the technician's private key (the key the
grant names), then runs commands: given with --command (repeatable), piped
on stdin, or typed at a prompt with line editing and history (readline,
history in ~/.tether_console_history) when stdin is a terminal.

Exit codes:
  0  session opened and every command succeeded
  1  the device refused: the grant, the answer, a command, or it is locked
  2  usage: a file missing or unreadable, a bad key or grant file, a bad
     option (--timeout must be more than 0)
  3  the port cannot be opened, or the device did not answer in time
"""

import argparse
import os
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent import console as dev
from cloud import firmware
from cloud.errors import CloudError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_PORT = 0, 1, 2, 3
REPLY_LINES_MAX = 1000
HISTORY_FILE = "~/.tether_console_history"


class ToolError(CloudError):
    code = "tool"
    exit_code = EXIT_USAGE


class Refused(ToolError):
    """The device said err: code is its reason."""
    exit_code = EXIT_REFUSED


class PortError(ToolError):
    code = "port"
    exit_code = EXIT_PORT


def answer(key, nonce, gid, device_id):
    """The technician's answer to a challenge: raw r || s, 64 bytes."""
    der = key.sign(dev.challenge_message(nonce, gid, device_id), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def gid_of(grant_message):
    """The grant id inside a grant (read without verifying: the device verifies)."""
    from agent import cose, grant
    try:
        _, _, _, payload, _ = cose.decode1(grant_message)
        return grant.parse(payload).gid
    except Exception as e:   # any parse failure is the user's file, not our bug
        raise ToolError("the grant file is not a tether grant: %s" % e, "bad_grant") from None


class Session:
    """One console session over a byte stream with readline()/write()
    (a pyserial port). Each reply is read up to its ok / err / end line."""

    def __init__(self, port, grant_message, key):
        self.port = port
        self.grant = grant_message
        self.key = key
        self.role = None
        self.last_challenge = None
        self.pending = b""       # bytes read ahead (an unprompted "end REASON") for the next reply

    def open(self):
        """Send the grant, answer the challenge; (role, technician, seconds)."""
        reset = getattr(self.port, "reset_input_buffer", None)
        if reset is not None:
            reset()             # boot messages, or the end of an earlier session
        self.pending = b""
        lines = self.request("hello " + self.grant.hex())
        words = lines[-1].split()
        if len(words) != 3 or words[0] != "challenge":
            raise ToolError("unexpected reply to hello: %r" % lines[-1], "protocol")
        nonce, device_id = bytes.fromhex(words[1]), words[2]
        self.last_challenge = (nonce, device_id)
        signature = answer(self.key, nonce, gid_of(self.grant), device_id)
        return self.auth(signature)

    def auth(self, signature):
        words = self.request("auth " + signature.hex())[-1].split()
        if len(words) != 5 or words[:2] != ["ok", "session"]:
            raise ToolError("unexpected reply to auth: %r" % " ".join(words), "protocol")
        self.role = words[2]
        return words[2], words[3], int(words[4])

    def run(self, command):
        """Output lines of a command; Refused if the device refuses it, or
        ended the session meanwhile (an "end REASON" waiting: the command is
        then not sent, so the device does not count it as a failed attempt)."""
        reason = self.ended()
        if reason is not None:
            raise Refused("the device ended the session: " + reason, reason)
        lines = self.request(command)
        return [line[2:] for line in lines if line.startswith("- ")]

    def close(self):
        return self.request("bye")

    def request(self, line):
        self.send(line)
        return self.reply()

    def send(self, line):
        try:
            self.port.write(line.encode("ascii") + b"\n")
            self.port.flush()
        except (OSError, ValueError) as e:
            raise PortError("cannot write to the port: %s" % e) from None

    def reply(self):
        """Lines up to the final one (ok, err or challenge: the device answers
        every line with exactly one). Refused for err, or if the device ended
        the session ("end REASON", sent unprompted) before or meanwhile."""
        lines = []
        ended = None
        while len(lines) < REPLY_LINES_MAX:
            line = self._readline()
            lines.append(line)
            words = line.split(" ", 2)
            if words[0] == "end" and len(words) > 1:
                ended = Refused("the device ended the session: " + words[1], words[1])
            elif words[0] == "err" and len(words) > 1:
                raise ended or Refused(words[2] if len(words) > 2 else line, words[1])
            elif words[0] in ("ok", "challenge"):
                if ended is not None:
                    raise ended
                return lines
        raise ToolError("more than %d lines in one reply" % REPLY_LINES_MAX, "protocol")

    def ended(self):
        """The REASON of an "end REASON" the device sent since the last reply,
        read without waiting (a port with in_waiting), else None."""
        try:
            waiting = getattr(self.port, "in_waiting", 0)
            if waiting:
                self.pending += self.port.read(waiting)
        except (OSError, ValueError) as e:
            raise PortError("cannot read from the port: %s" % e) from None
        for raw in self.pending.split(b"\n")[:-1]:
            words = raw.rstrip(b"\r").decode("ascii", "replace").split(" ", 2)
            if words[0] == "end" and len(words) > 1:
                return words[1]
        return None

    def _readline(self):
        if b"\n" in self.pending:
            raw, self.pending = self.pending.split(b"\n", 1)
            return raw.rstrip(b"\r").decode("ascii", "replace")
        try:
            raw, self.pending = self.pending + self.port.readline(), b""
        except (OSError, ValueError) as e:     # pyserial's SerialException is an OSError
            raise PortError("cannot read from the port: %s" % e) from None
        if not raw.endswith(b"\n"):
            timeout = getattr(self.port, "timeout", None)
            raise PortError("the device did not answer" + (" within %g s" % timeout if timeout else ""),
                            "timeout")
        return raw.rstrip(b"\r\n").decode("ascii", "replace")


# ---------------------------------------------------------------- command line

def add_parser(subparsers):
    c = subparsers.add_parser("console", help="open a field technician's console session on a device",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("port", metavar="PORT", help="serial port or pyserial URL")
    c.add_argument("--grant", required=True, help="grant file from `tether cloud support grant`")
    c.add_argument("--key", required=True, help="the technician's private key (PEM, P-256)")
    c.add_argument("--command", "-c", action="append", default=[], dest="commands",
                   help="run this command and exit (repeatable); default: stdin or a prompt")
    c.add_argument("--baud", type=_positive(int), default=115200,
                   help="serial line speed in bit/s (default 115200; socket:// and loop:// ignore it)")
    c.add_argument("--timeout", type=_positive(float), default=10.0,
                   help="seconds to wait for each reply, more than 0 (default 10)")
    return c


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not a number: %r" % text) from None
        if not value > 0:
            raise argparse.ArgumentTypeError("must be more than 0: %r" % text)
        return value
    parse.__name__ = kind.__name__
    return parse


def main(args):
    try:
        grant_message = _read_grant(args.grant)
        key = firmware.load_private_key(args.key)
        port = _open_port(args.port, args.baud, args.timeout)
    except CloudError as e:
        return _fail(e)
    try:
        return _session(Session(port, grant_message, key), args)
    except CloudError as e:
        return _fail(e)
    finally:
        port.close()


def _session(session, args):
    role, technician, seconds = session.open()
    print("session open: %s as %s, %d s left" % (technician, role, seconds), file=sys.stderr)
    status = EXIT_OK
    for command in _commands(args):
        try:
            for line in session.run(command):
                print(line)
        except Refused as e:
            print("refused: %s (%s)" % (e.message, e.code), file=sys.stderr)
            if e.code in ("expired", "idle", "revoked", "locked", "audit_full"):
                return EXIT_REFUSED
            status = EXIT_REFUSED
    session.close()
    return status


def _commands(args):
    if args.commands:
        return iter(args.commands)
    if sys.stdin.isatty():
        return _prompt()
    return (line.strip() for line in sys.stdin if line.strip())


def _prompt():
    try:
        import readline
    except ImportError:
        readline = None
    history = os.path.expanduser(HISTORY_FILE)
    if readline is not None and os.path.exists(history):
        readline.read_history_file(history)
    try:
        while True:
            try:
                line = input("tether> ").strip()
            except EOFError:
                return
            if line in ("exit", "quit"):
                return
            if line:
                yield line
    finally:
        if readline is not None:
            readline.set_history_length(1000)
            readline.write_history_file(history)


def _read_grant(path):
    data = firmware.read_file(path, "grant")
    text = data.strip()
    if text and all(c in b"0123456789abcdefABCDEF" for c in text):
        data = bytes.fromhex(text.decode())
    gid_of(data)
    return data


def _open_port(url, baud, timeout):
    import serial
    try:
        return serial.serial_for_url(url, baudrate=baud, timeout=timeout, write_timeout=timeout)
    except (serial.SerialException, ValueError, OSError) as e:
        raise PortError("cannot open %s: %s" % (url, e)) from None


def _fail(e):
    print("tether console: %s" % describe(e), file=sys.stderr)
    return getattr(e, "exit_code", EXIT_USAGE)


def describe(e):
    """A CloudError for people: its message, then its code in parentheses when
    the code adds something (a device's refusal: `expired`, `bad_answer`), not
    a generic one (an input the tool could not use, `firmware`: the message
    says what) nor one the message already ends with."""
    if isinstance(e, firmware.FirmwareError) or e.code in ("cloud", "tool", "port") \
            or e.message.endswith("(%s)" % e.code):
        return e.message
    return "%s (%s)" % (e.message, e.code)


def _standalone(argv=None):
    parser = argparse.ArgumentParser(prog="tether")
    add_parser(parser.add_subparsers(dest="command_name"))
    return main(parser.parse_args(["console"] + list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(_standalone())
