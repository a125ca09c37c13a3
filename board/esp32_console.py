"""The field console on an ESP32's UART, under MicroPython.

    from board import esp32_console
    esp32_console.serve(device_id, site, support_keys)   # never returns

The console (agent/console.py) replaces the MicroPython REPL on that UART:
a production build must not leave the unauthenticated REPL there. Build
with the REPL off the UART (MICROPY_HW_ENABLE_UART_REPL 0, frozen code,
secure boot and flash encryption; docs/console.md); `detach_repl()` is the
weaker runtime fallback for builds that still attach it with os.dupterm.

Each pass of the loop reads what arrived, feeds whole lines to the console,
and gives it one Tick, so a grant's signature check runs a few bits per
pass (the board stays responsive) and the audit record is on flash before a
command runs or an answer goes out (board/console_port.py ConsolePort.run).
"""

import os
import time

from board.console_port import ConsolePort, boot_console
from board.esp32 import Clock, FlashStorage

BAUD = 115200
BITS_PER_TICK = 8          # of the 256-bit scalar per pass: 32 passes per signature
PASS_MS = 5


class UartStream:
    """machine.UART as the stream ConsolePort reads and writes: read()
    returns b"" rather than None when nothing arrived."""

    def __init__(self, uart):
        self.uart = uart

    def read(self, n):
        waiting = self.uart.any()
        if not waiting:
            return b""
        return self.uart.read(min(waiting, n)) or b""

    def write(self, data):
        self.uart.write(data)


class Commands:
    """What the board answers; hooks map the privileged ones to the updater
    and identity code of the running agent (reboot, rollback, rotate)."""

    def __init__(self, device_id, version="0", hooks=None):
        self.device_id = device_id
        self.version = version
        self.hooks = dict(hooks or {})

    def run(self, command, args, role):
        hook = self.hooks.get(command)
        if hook is not None:
            return hook(args), None
        if command == "status":
            return ["device %s" % self.device_id, "version %s" % self.version], None
        return [], "unsupported"

    def session_ended(self, reason):
        pass


def detach_repl():
    """Take the REPL off the UART where the build attaches it with dupterm;
    True if that was possible. Not a substitute for a build without it."""
    dupterm = getattr(os, "dupterm", None)
    if dupterm is None:
        return False
    try:
        dupterm(None, 0)
    except (TypeError, ValueError, OSError):
        try:
            dupterm(None)
        except (TypeError, ValueError, OSError):
            return False
    return True


def make_port(uart, device_id, site, support_keys, storage=None, clock=None, commands=None,
              random_bytes=None, bits_per_tick=BITS_PER_TICK):
    storage = storage or FlashStorage()
    console = boot_console(device_id, site, support_keys, storage, random_bytes or os.urandom,
                           bits_per_tick=bits_per_tick)
    return ConsolePort(UartStream(uart), console, storage, commands or Commands(device_id), clock or Clock())


def serve(device_id, site, support_keys, uart_id=0, baud=BAUD, commands=None):
    import machine
    detach_repl()
    port = make_port(machine.UART(uart_id, baud), device_id, site, support_keys, commands=commands)
    while True:
        port.poll(work_ticks_max=0)
        time.sleep_ms(PASS_MS)
