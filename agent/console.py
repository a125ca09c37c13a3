# The device side of the field technician's serial console. Sans-IO: lines
# and ticks in, actions out (send a line, append to the audit log, persist
# console state, execute a command). The driver (board/console_port.py)
# carries them out in order and stops at the first failure.
#
# Protocol (docs/console.md), one ASCII line each way, LF-terminated:
#
#   tool -> device                     device -> tool
#   hello <grant, hex>                 challenge <nonce, hex> <device id>
#   auth <signature, hex>              ok session <role> <technician> <seconds left>
#   <command> [args]                   - <output line> ...  then  ok | err <code> <text>
#   bye                                ok bye
#                                      end <reason>   (the device closed the session)
#
# The grant (agent/grant.py) names the technician's public key; the answer
# to a challenge is their ES256 signature over SHA-256 of
# cbor([CONTEXT, nonce, grant id, device id]). The nonce is fresh per hello
# and used at most once, so a captured answer opens nothing later or
# elsewhere.
#
# Every state transition is in TRANSITIONS: (state, input) -> handler; the
# handler returns the next state. Timeouts are checked (the TICK row) before
# every line, so a line that arrives after the idle timeout is not run.
# Every session, command, refusal and failure is recorded in the audit log
# (agent/auditlog.py) before the reply and before anything is executed.
#
# Signature checks (the grant's, then the answer's) are stepped: with
# bits_per_tick below 256 the console waits in CHECKING and each Tick runs
# that many bits of agent.p256.Verifier, so a small board's loop keeps
# turning and its heap stays small; lines meanwhile get "err busy". The
# default, 256, checks at once. The cloud's signed messages (a revocation
# list, an audit checkpoint) are stepped the same way beside whatever the
# session does, one pending check of each kind (a newer message replaces
# the one being checked), and take effect once their check is done: a
# checkpoint is held, and the log is rewritten to it at the next RotateLog
# (the driver hands the whole log as it is on flash then).
#
# Limits: LINE_CHARS_MAX per line (longer is refused), ARGS_MAX arguments,
# FAILURES_MAX failed attempts (an unanswered challenge is one) before a
# lockout of LOCKOUT_MS (doubling per consecutive lockout up to
# LOCKOUT_MS_MAX), IDLE_MS idle and SESSION_MS_MAX per session (never past
# the grant's exp), CHALLENGE_MS to answer. The failure count and lockout
# are persisted (STATE_FILE), so a power cycle does not reset them. A full
# audit log refuses new sessions.

import hashlib
from binascii import hexlify, unhexlify

from agent import auditlog, cbor, cose, grant
from agent.actions import Append, WriteAtomic
from agent.errors import LocalError, RemoteError
from agent.p256 import SignatureError, Verifier
from agent.value import Value

CONTEXT = "tether-console-v1"
AUDIT_FILE = "audit.log"
STATE_FILE = "console.state"
NONCE_BYTES = 16
LINE_CHARS_MAX = 2 * grant.GRANT_BYTES_MAX + 16
ARGS_MAX = 4
ARG_CHARS_MAX = 64
FAILURES_MAX = 5
LOCKOUT_MS = 5 * 60 * 1000
LOCKOUT_MS_MAX = 60 * 60 * 1000
CHALLENGE_MS = 60 * 1000
IDLE_MS = 5 * 60 * 1000
SESSION_MS_MAX = 60 * 60 * 1000
TAIL_MAX = 100

IDLE = "idle"
CHALLENGED = "challenged"
CHECKING = "checking"           # a signature check is being stepped (Tick does the work)
OPEN = "open"
LOCKED = "locked"

STATES = (IDLE, CHALLENGED, CHECKING, OPEN, LOCKED)

HELLO = "hello"
AUTH = "auth"
COMMAND = "command"
BYE = "bye"
TICK = "tick"
BAD = "bad"

REVOCATIONS = "revocations"     # the cloud's signed messages (Console.cloud_checks)
CHECKPOINT = "checkpoint"
CLOUD_WAITING_MAX = 4           # of them waiting behind the ones being checked

# command -> (least role, fewest args, most args, numeric args)
COMMANDS = {
    "help": (grant.VIEWER, 0, 0, False),
    "status": (grant.VIEWER, 0, 0, False),
    "versions": (grant.VIEWER, 0, 0, False),
    "telemetry": (grant.VIEWER, 0, 1, True),
    "net": (grant.VIEWER, 0, 0, False),
    "log": (grant.VIEWER, 0, 1, True),
    "reboot": (grant.TECHNICIAN, 0, 0, False),
    "rollback": (grant.TECHNICIAN, 0, 0, False),
    "rotate-identity": (grant.TECHNICIAN, 0, 0, False),
    "set": (grant.TECHNICIAN, 2, 2, False),
    "factory-reset": (grant.ADMIN, 1, 1, False),   # the argument must be the device id
}
ARG_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/=+-"


class ConsoleError(LocalError):
    code = "console"


# ---------------------------------------------------------------- events

class Line(Value):
    """A line from the serial port (bytes, without the newline). now_ms is
    the monotonic clock (board ticks); time_s the device's wall clock."""
    __slots__ = ("data", "now_ms", "time_s")

    def __init__(self, data, now_ms, time_s):
        self.data = data
        self.now_ms = now_ms
        self.time_s = time_s


class Tick(Value):
    __slots__ = ("now_ms", "time_s")

    def __init__(self, now_ms, time_s):
        self.now_ms = now_ms
        self.time_s = time_s


class Revocations(Value):
    """A signed revocation list arrived from the cloud (device online)."""
    __slots__ = ("message", "now_ms", "time_s")

    def __init__(self, message, now_ms, time_s):
        self.message = message
        self.now_ms = now_ms
        self.time_s = time_s


class TrustedTime(Value):
    """The cloud's time, from an authenticated session (mTLS): raises the
    trusted floor under the device clock (agent/grant.py)."""
    __slots__ = ("now_ms", "time_s")

    def __init__(self, now_ms, time_s):
        self.now_ms = now_ms
        self.time_s = time_s


class Checkpoint(Value):
    """The cloud verified the audit log up to a record and signed a
    checkpoint of it: check it and hold it for the next RotateLog."""
    __slots__ = ("message", "now_ms", "time_s")

    def __init__(self, message, now_ms, time_s):
        self.message = message
        self.now_ms = now_ms
        self.time_s = time_s


class RotateLog(Value):
    """log is the audit log as it is on flash now: drop the records before
    the checkpoint held (the log is bounded). Nothing happens without one."""
    __slots__ = ("log", "now_ms", "time_s")

    def __init__(self, log, now_ms, time_s):
        self.log = log
        self.now_ms = now_ms
        self.time_s = time_s


# ---------------------------------------------------------------- actions

class Send(Value):
    """Write this line (str, no newline) to the serial port."""
    __slots__ = ("line",)

    def __init__(self, line):
        self.line = line


class Execute(Value):
    """Run an authorised command; then call Console.finished() with its output."""
    __slots__ = ("command", "args", "role", "technician")

    def __init__(self, command, args, role, technician):
        self.command = command
        self.args = args
        self.role = role
        self.technician = technician


class EndSession(Value):
    """The session ended (the driver may drop per-session state)."""
    __slots__ = ("reason",)

    def __init__(self, reason):
        self.reason = reason


# ---------------------------------------------------------------- parsing

def parse_line(data):
    """(input, verb, args) for one line; input BAD with verb = error code."""
    if not isinstance(data, (bytes, bytearray)):
        return BAD, "bad_type", []
    if len(data) > LINE_CHARS_MAX:
        return BAD, "too_long", []
    for b in data:
        if b < 0x20 or b > 0x7E:
            if b != 0x0D:
                return BAD, "not_ascii", []
    words = bytes(data).decode().replace("\r", "").split()
    if not words:
        return BAD, "empty", []
    verb, args = words[0], words[1:]
    if verb == HELLO or verb == "auth":
        if len(args) != 1:
            return BAD, "bad_args", []
        return (HELLO if verb == HELLO else AUTH), verb, args
    if verb == BYE:
        return BYE, verb, []
    if len(args) > ARGS_MAX or len(verb) > ARG_CHARS_MAX:
        return BAD, "bad_args", []
    for arg in args:
        if len(arg) > ARG_CHARS_MAX or not _allowed(arg):
            return BAD, "bad_args", []
    return COMMAND, verb, args


def _allowed(text):
    for ch in text:
        if ch not in ARG_CHARS:
            return False
    return True


def _unhex(text, limit):
    if len(text) > 2 * limit or len(text) % 2:
        return None
    try:
        return unhexlify(text.encode())
    except ValueError:
        return None


def hex_text(data):
    return hexlify(data).decode()


def challenge_digest(nonce, gid, device_id):
    """What the technician's key signs (as SHA-256) to answer a challenge."""
    return hashlib.sha256(cbor.dumps([CONTEXT, nonce, gid, device_id])).digest()


def challenge_message(nonce, gid, device_id):
    """The bytes whose SHA-256 is challenge_digest (for signers that hash)."""
    return cbor.dumps([CONTEXT, nonce, gid, device_id])


# ---------------------------------------------------------------- the machine

TRANSITIONS = {
    (IDLE, HELLO): "_hello",
    (IDLE, AUTH): "_no_challenge",
    (IDLE, COMMAND): "_not_open",
    (IDLE, BYE): "_ok_bye",
    (IDLE, TICK): "_stay",
    (IDLE, BAD): "_bad_line",
    (CHALLENGED, HELLO): "_hello",
    (CHALLENGED, AUTH): "_auth",
    (CHALLENGED, COMMAND): "_not_open",
    (CHALLENGED, BYE): "_ok_bye",
    (CHALLENGED, TICK): "_challenge_timeout",
    (CHALLENGED, BAD): "_bad_line",
    (CHECKING, HELLO): "_busy",
    (CHECKING, AUTH): "_busy",
    (CHECKING, COMMAND): "_busy",
    (CHECKING, BYE): "_busy",
    (CHECKING, TICK): "_work",
    (CHECKING, BAD): "_busy",
    (OPEN, HELLO): "_already_open",
    (OPEN, AUTH): "_already_open",
    (OPEN, COMMAND): "_command",
    (OPEN, BYE): "_close_bye",
    (OPEN, TICK): "_session_timeouts",
    (OPEN, BAD): "_bad_line",
    (LOCKED, HELLO): "_locked",
    (LOCKED, AUTH): "_locked",
    (LOCKED, COMMAND): "_locked",
    (LOCKED, BYE): "_locked",
    (LOCKED, TICK): "_lock_timeout",
    (LOCKED, BAD): "_locked",
}


class Console:
    def __init__(self, device_id, site, support_keys, chain, random_bytes, state=None,
                 bits_per_tick=256):
        self.device_id = device_id
        self.site = site
        self.keys = support_keys        # {kid: 65-byte point}, pinned
        self.chain = chain              # agent.auditlog.AuditChain, recovered from flash
        self.random_bytes = random_bytes
        self.state = IDLE
        self.floor_s = 0                # trusted lower bound on the time (agent/grant.py)
        self.revoked = []
        self.revocations_iat = 0
        self.failures = 0
        self.lockouts = 0               # consecutive lockouts (doubles the next)
        self.lock_until_ms = 0
        self.grant = None
        self.nonce = None
        self.pending = None             # (HELLO or AUTH, grant, agent.p256.Verifier)
        self.cloud_checks = {}          # REVOCATIONS or CHECKPOINT: (payload, Verifier)
        self.cloud_waiting = []         # [(kind, message)] behind those, in arrival order
        self.checkpoint = None          # (seq, head) of a verified checkpoint, until rotated
        self.provisional = False        # failures includes the open challenge
        self.bits_per_tick = bits_per_tick
        self.deadline_ms = 0            # challenge or session end
        self.idle_until_ms = 0
        self.refused_while_locked = 0
        self.audit_dropped = 0
        self.now_ms = 0
        self.time_s = 0
        self._booting_locked = False
        if state:
            self._restore(state)

    # -- the entry point --------------------------------------------------

    def feed(self, event):
        self.now_ms, self.time_s = event.now_ms, event.time_s
        if self._booting_locked:
            self._booting_locked = False
            self.lock_until_ms = self.now_ms + self._lockout_ms()
        if isinstance(event, Tick):
            return self._cloud_work() + self._step(TICK, None, [])
        if isinstance(event, Revocations):
            return self._cloud_check(REVOCATIONS, event.message)
        if isinstance(event, Checkpoint):
            return self._cloud_check(CHECKPOINT, event.message)
        if isinstance(event, RotateLog):
            return self._rotate(event.log)
        if isinstance(event, TrustedTime):
            if type(event.time_s) is not int or event.time_s <= self.floor_s:
                return []
            self.floor_s = event.time_s
            return self._save()
        if not isinstance(event, Line):
            raise ConsoleError("not a console event: %r" % (event,), "bad_event")
        actions = self._cloud_work() + self._step(TICK, None, [])
        kind, verb, args = parse_line(event.data)
        if kind == BAD and verb == "empty":
            return actions
        return actions + self._step(kind, verb, args)

    def _step(self, kind, verb, args):
        handler = TRANSITIONS.get((self.state, kind))
        if handler is None:
            raise ConsoleError("no transition for %s in %s" % (kind, self.state), "bad_state")
        next_state, actions = getattr(self, handler)(verb, args)
        self.state = next_state
        return actions

    def busy(self):
        """True while a signature check waits for Ticks to step it."""
        return self.state == CHECKING or bool(self.cloud_checks)

    def now(self):
        """Effective wall time, s: the device clock, never below the floor."""
        return grant.effective_now(self.time_s, self.floor_s)

    # -- before a session -------------------------------------------------

    def _hello(self, verb, args):
        if self.nonce is not None:      # the previous challenge was never answered
            locked = self._abandon(True)
            if locked is not None:
                return locked
        self.grant = self.nonce = None
        if self.chain.full():     # fail closed; and no room to record it
            return IDLE, [Send("err audit_full audit log is full; connect the device to upload it")]
        message = _unhex(args[0], grant.GRANT_BYTES_MAX)
        if message is None:
            return self._fail("malformed", "grant is not hex of at most %d bytes" % grant.GRANT_BYTES_MAX)
        try:
            g, verifier = grant.start(message, self.keys)
        except RemoteError as e:
            return self._fail(e.code, e.message)
        self.pending = (HELLO, g, verifier)
        return self._work(None, None)

    def _work(self, verb, args):
        """Step the pending signature check; act on it once it is done."""
        kind, g, verifier = self.pending
        if not verifier.step(self.bits_per_tick):
            return CHECKING, []
        self.pending = None
        if kind == HELLO:
            return self._grant_checked(g, verifier)
        if not verifier.result():
            return self._fail("bad_answer", "the answer is not the grant holder's signature")
        try:        # again: a revocation list (or the clock) may have moved while it was checked
            grant.check(g, self.device_id, self.site, self.time_s, self.floor_s, self.revoked)
        except RemoteError as e:
            return self._fail(e.code, e.message)
        return self._open(g)

    def _busy(self, verb, args):
        return CHECKING, [Send("err busy still checking a signature")]

    def _grant_checked(self, g, verifier):
        try:
            grant.finish(g, verifier, self.device_id, self.site, self.time_s, self.floor_s,
                         self.revoked)
        except RemoteError as e:
            return self._fail(e.code, e.message)
        self.grant = g
        self.nonce = self.random_bytes(NONCE_BYTES)
        self.deadline_ms = self.now_ms + CHALLENGE_MS
        self.failures += 1              # a challenge counts as a failure until answered,
        self.provisional = True         # so replaying a captured grant cannot loop forever
        actions = self._audit("challenge", {"gid": g.gid, "tech": g.technician, "role": g.role})
        actions += self._save()
        return CHALLENGED, actions + [Send("challenge %s %s" % (hex_text(self.nonce), self.device_id))]

    def _auth(self, verb, args):
        g, nonce = self.grant, self.nonce
        self.nonce = None               # one answer per challenge, right or wrong
        self.grant = None               # back only once the answer checks out
        signature = _unhex(args[0], 64)
        try:
            if signature is None:
                raise SignatureError("the answer is not hex", "malformed")
            verifier = Verifier(g.key, challenge_digest(nonce, g.gid, self.device_id), signature)
        except SignatureError:
            return self._fail("bad_answer", "the answer is not the grant holder's signature")
        self.pending = (AUTH, g, verifier)
        return self._work(None, None)

    def _open(self, g):
        self.grant = g
        self.failures = 0
        self.provisional = False
        self.lockouts = 0
        self.floor_s = grant.raise_floor(self.floor_s, g)
        left_ms = (g.exp - self.now()) * 1000
        self.deadline_ms = self.now_ms + (left_ms if left_ms < SESSION_MS_MAX else SESSION_MS_MAX)
        self.idle_until_ms = self.now_ms + IDLE_MS
        actions = self._audit("session_open", {"gid": g.gid, "tech": g.technician, "role": g.role})
        actions += self._save()
        seconds = (self.deadline_ms - self.now_ms) // 1000
        return OPEN, actions + [Send("ok session %s %s %d" % (g.role, g.technician, seconds))]

    def _no_challenge(self, verb, args):
        return self._fail("no_challenge", "no challenge is outstanding (send hello first)")

    def _not_open(self, verb, args):
        self.grant = self.nonce = None
        return self._fail("not_open", "no session: send hello with a grant first")

    def _ok_bye(self, verb, args):
        if self.nonce is not None:
            locked = self._abandon(False)
            if locked is not None:
                return LOCKED, locked[1] + [Send("ok bye")]
        self.grant = self.nonce = None
        return IDLE, [Send("ok bye")]

    def _stay(self, verb, args):
        return self.state, []

    def _bad_line(self, verb, args):
        detail = {"code": verb}
        if self.grant is not None and self.state == OPEN:
            detail["gid"] = self.grant.gid
        actions = self._audit("refused", detail)
        return self.state, actions + [Send("err %s line refused" % verb)]

    def _challenge_timeout(self, verb, args):
        if self.now_ms - self.deadline_ms < 0:
            return CHALLENGED, []
        actions = self._audit("challenge_expired", {})
        locked = self._abandon(False)
        if locked is not None:
            return LOCKED, actions + locked[1]
        return IDLE, actions

    # -- in a session -----------------------------------------------------

    def _command(self, verb, args):
        g = self.grant
        if self.chain.full():
            return IDLE, self._close("audit_full") + [
                Send("err audit_full audit log is full; session closed")]
        self.idle_until_ms = self.now_ms + IDLE_MS
        spec = COMMANDS.get(verb)
        detail = {"gid": g.gid, "cmd": verb, "args": args, "role": g.role}
        if spec is None:
            return OPEN, self._refuse("unknown_command", "no command %s" % verb, detail)
        least, low, high, numeric = spec
        if grant.ROLE_RANK[g.role] < grant.ROLE_RANK[least]:
            detail["needs"] = least
            return OPEN, self._refuse("forbidden", "%s needs role %s, grant has %s"
                                      % (verb, least, g.role), detail)
        problem = _check_args(verb, args, low, high, numeric, self.device_id)
        if problem is not None:
            return OPEN, self._refuse("bad_args", problem, detail)
        actions = self._audit("command", detail)
        return OPEN, actions + [Execute(verb, args, g.role, g.technician)]

    def finished(self, command, lines, error=None):
        """The reply to an Execute, after the driver ran it: output lines,
        then ok, or err (recorded in the audit log) if error is a code."""
        actions = [Send("- " + _printable(line)) for line in lines[:TAIL_MAX]]
        if error is None:
            return actions + [Send("ok")]
        actions = self._audit("command_failed", {"cmd": command, "code": error}) + actions
        return actions + [Send("err %s %s failed" % (error, command))]

    def _already_open(self, verb, args):
        detail = {"gid": self.grant.gid, "cmd": verb}
        return OPEN, self._refuse("session_open", "a session is already open", detail)

    def _close_bye(self, verb, args):
        return IDLE, self._close("bye") + [Send("ok bye")]

    def _session_timeouts(self, verb, args):
        if self.grant.gid in self.revoked:
            return IDLE, self._close("revoked") + [Send("end revoked")]
        if self.now_ms - self.deadline_ms >= 0 or self.now() >= self.grant.exp:
            return IDLE, self._close("expired") + [Send("end expired")]
        if self.now_ms - self.idle_until_ms >= 0:
            return IDLE, self._close("idle") + [Send("end idle")]
        return OPEN, []

    def _close(self, reason):
        actions = self._audit("session_close", {"gid": self.grant.gid, "reason": reason})
        self.grant = None
        return actions + [EndSession(reason)]

    # -- failures and lockout ---------------------------------------------

    def _fail(self, code, message):
        if self.provisional:            # charged when the challenge was issued
            self.provisional = False
        else:
            self.failures += 1
        actions = self._audit("auth_fail", {"code": code, "n": self.failures})
        if self.failures < FAILURES_MAX:
            return IDLE, actions + self._save() + [Send("err %s %s" % (code, message))]
        return self._lock(actions, code, message)

    def _abandon(self, reply):
        """An unanswered challenge: its charge stays. (LOCKED, actions) if
        that was one failure too many, else None."""
        self.provisional = False
        self.grant = self.nonce = None
        if self.failures < FAILURES_MAX:
            return None
        actions = self._audit("auth_fail", {"code": "abandoned", "n": self.failures})
        if not reply:
            state, actions = self._lock(actions, "abandoned", "")
            return state, actions[:-1]          # nobody asked: no reply line
        return self._lock(actions, "abandoned", "a challenge was left unanswered")

    def _lock(self, actions, code, message):
        self.lock_until_ms = self.now_ms + self._lockout_ms()
        self.lockouts += 1
        self.refused_while_locked = 0
        actions += self._audit("lockout", {"failures": self.failures,
                                           "ms": self.lock_until_ms - self.now_ms})
        actions += self._save()
        return LOCKED, actions + [Send("err %s %s; too many failures, console locked"
                                       % (code, message))]

    def _lockout_ms(self):
        ms = LOCKOUT_MS
        for _ in range(self.lockouts):
            ms *= 2
            if ms >= LOCKOUT_MS_MAX:
                return LOCKOUT_MS_MAX
        return ms

    def _locked(self, verb, args):
        self.refused_while_locked += 1
        return LOCKED, [Send("err locked console locked; try later")]

    def _lock_timeout(self, verb, args):
        if self.now_ms - self.lock_until_ms < 0:
            return LOCKED, []
        self.failures = 0
        actions = self._audit("unlock", {"refused": self.refused_while_locked})
        return IDLE, actions + self._save()

    # -- the cloud's signed messages ----------------------------------------

    def _cloud_check(self, kind, message):
        """Check a revocation list or a checkpoint: at once with 256 bits per
        tick; else from the next Tick on, after those of its kind that came
        before it (in order: a replayed or forged message must not displace
        the genuine one being checked). At most CLOUD_WAITING_MAX wait; more
        are refused and recorded (the cloud sends its list again at the next
        sync, its checkpoint with the next ack)."""
        if kind in self.cloud_checks:
            if len(self.cloud_waiting) >= CLOUD_WAITING_MAX:
                return self._audit(kind + "_refused", {"code": "busy"})
            self.cloud_waiting.append((kind, message))
            return []
        try:
            if kind == REVOCATIONS:
                check = grant.start_revocations(message, self.keys)
            else:
                if not isinstance(message, (bytes, bytearray)):
                    raise auditlog.AuditError("a checkpoint is bytes", "malformed")
                check = cose.start1(message, self.keys, auditlog.CHECKPOINT_AAD)
        except RemoteError as e:
            return self._audit(kind + "_refused", {"code": e.code})
        self.cloud_checks[kind] = check
        if self.bits_per_tick < 256:
            return []           # stepped: the work starts at the next Tick (a small heap per step)
        return self._cloud_work(kind)

    def _cloud_work(self, only=None):
        """Step the pending checks of the cloud's messages; apply those done."""
        actions = []
        for kind in (REVOCATIONS, CHECKPOINT):
            check = self.cloud_checks.get(kind)
            if check is None or (only is not None and kind != only):
                continue
            payload, verifier = check
            if not verifier.step(self.bits_per_tick):
                continue
            del self.cloud_checks[kind]
            if not verifier.result():
                actions += self._audit(kind + "_refused", {"code": "bad_signature"})
            elif kind == REVOCATIONS:
                actions += self._revocations(payload)
            else:
                actions += self._hold_checkpoint(payload)
            actions += self._next_waiting(kind)
        return actions

    def _next_waiting(self, kind):
        """Start the check of the next message of `kind` that waits."""
        for i, (waiting_kind, message) in enumerate(self.cloud_waiting):
            if waiting_kind == kind:
                del self.cloud_waiting[i]
                return self._cloud_check(kind, message)
        return []

    def _revocations(self, payload):
        try:
            iat, revoked = grant.revocations_body(payload, self.revocations_iat, self.revoked)
        except RemoteError as e:
            return self._audit("revocations_refused", {"code": e.code})
        self.revoked, self.revocations_iat = revoked, iat
        if iat > self.floor_s:
            self.floor_s = iat
        actions = self._audit("revocations", {"count": len(revoked), "iat": iat}) + self._save()
        if self.state == OPEN:
            actions += self._step(TICK, None, [])
        return actions

    # -- audit log rotation -------------------------------------------------

    def _hold_checkpoint(self, payload):
        try:
            body = cbor.loads(payload)
            if not isinstance(body, dict) or body.get("device") != self.device_id:
                raise auditlog.AuditError("checkpoint is for another device", "wrong_device")
            seq, head = body.get("seq"), body.get("head")
            if type(seq) is not int or seq < 0 or not isinstance(head, bytes):
                raise auditlog.AuditError("checkpoint seq and head malformed", "malformed")
        except RemoteError as e:
            return self._audit("checkpoint_refused", {"code": e.code})
        if self.checkpoint is None or seq > self.checkpoint[0]:
            self.checkpoint = (seq, head)
        return []

    def _rotate(self, log):
        """Keep the log from the checkpoint held on; refuse a log it does not fit."""
        if self.checkpoint is None:
            return []
        (seq, head), self.checkpoint = self.checkpoint, None
        try:
            kept = auditlog.rotate(log, seq, head)
        except RemoteError as e:
            return self._audit("checkpoint_refused", {"code": e.code})
        self.chain.size = len(kept)
        return [WriteAtomic(AUDIT_FILE, kept)] + self._audit("rotated", {"from": seq})

    # -- audit and persisted state ----------------------------------------

    def _refuse(self, code, message, detail=None):
        detail = detail or {}
        detail["code"] = code
        return self._audit("refused", detail) + [Send("err %s %s" % (code, message))]

    def _audit(self, kind, detail):
        if self.chain.hard_full():
            self.audit_dropped += 1     # only after new sessions are refused
            return []
        return [Append(AUDIT_FILE, self.chain.record(self.now(), kind, detail))]

    def _save(self):
        state = {"floor": self.floor_s, "rev_iat": self.revocations_iat, "revoked": self.revoked,
                 "failures": self.failures, "lockouts": self.lockouts,
                 "locked": self.failures >= FAILURES_MAX}
        return [WriteAtomic(STATE_FILE, cbor.dumps(state))]

    def _restore(self, data):
        try:
            state = cbor.loads(data)
            self.floor_s = int(state["floor"])
            self.revocations_iat = int(state["rev_iat"])
            self.revoked = list(state["revoked"])
            self.failures = int(state["failures"])
            self.lockouts = int(state["lockouts"])
            locked = state["locked"] is True
        except (RemoteError, KeyError, TypeError, ValueError):
            self.failures, locked = FAILURES_MAX, True   # unreadable: fail closed
        if locked:
            self.state = LOCKED
            self._booting_locked = True


def _check_args(verb, args, low, high, numeric, device_id):
    if not low <= len(args) <= high:
        return "%s takes %d..%d arguments" % (verb, low, high)
    if numeric:
        for arg in args:
            if not arg.isdigit() or not 1 <= int(arg) <= TAIL_MAX:
                return "%s takes a count of 1..%d" % (verb, TAIL_MAX)
    if verb == "factory-reset" and args[0] != device_id:
        return "factory-reset needs this device's id as confirmation"
    return None


def _printable(text):
    out = []
    for ch in str(text)[:200]:
        out.append(ch if " " <= ch <= "~" else "?")
    return "".join(out)
