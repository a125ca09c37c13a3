"""The console on an ESP32 UART (board/esp32_console.py), on real MicroPython:
the board's driver loop (UART stream, flash storage, one Tick a pass) serves
a technician's session end to end. The UART is a faithful stand-in for
machine.UART (any/read/write, read returning None when empty), the one part
that cannot exist here; everything else is the code the board runs."""

from cloud import firmware
from cloud.console_tool import answer

from mpy import require_micropython, run_micropython_report
from test_grant_micropython import KID, NOW, SUPPORT, TECH, make

HEAP_KB = 128

SETUP = r"""
import binascii
from board import esp32_console
from board.esp32 import FlashStorage
from agent import auditlog, console

class FakeUart:
    def __init__(self):
        self.rx = bytearray()
        self.tx = bytearray()
    def any(self):
        return len(self.rx)
    def read(self, n):
        if not self.rx:
            return None
        data = bytes(self.rx[:n])
        self.rx = self.rx[n:]
        return data
    def write(self, data):
        self.tx.extend(data)

class FixedClock:
    def __init__(self):
        self.t = 0
    def now_ms(self):
        return %d * 1000
    def ticks_ms(self):
        self.t += 5
        return self.t

uart = FakeUart()
storage = FlashStorage("/console-data")
KEYS = {binascii.unhexlify(%r): binascii.unhexlify(%r)}
port = esp32_console.make_port(uart, "dev-1", None, KEYS, storage=storage, clock=FixedClock(),
                               random_bytes=lambda n: bytes(range(n)), bits_per_tick=4)
def say(line):
    uart.rx.extend(line + b"\n")
def poll():
    port.poll(work_ticks_max=0)
def show():
    print("|".join(uart.tx.decode().strip().split("\n")))
    uart.tx = bytearray()
"""


def test_a_session_over_the_esp32_uart_driver_on_micropython():
    require_micropython()
    grant = make()
    nonce = bytes(range(16))
    signature = answer(TECH, nonce, bytes(range(16)), "dev-1")
    setup = SETUP % (NOW, KID.hex(), firmware.public_bytes(SUPPORT).hex())
    passes = ["poll()"] * 70  # 4 bits a pass: a signature check takes 64 passes
    steps = (["say(b'hello %s')" % grant.hex()] + passes + ["show()", "say(b'auth %s')" % signature.hex()]
             + passes + ["show()", "say(b'status')\npoll()\nshow()", "say(b'reboot')\npoll()\nshow()",
                         "say(b'bye')\npoll()\nshow()",
                         "r = auditlog.check(storage.read(console.AUDIT_FILE), 'dev-1')\n"
                         "print(r['records'], r['tamper'])"])
    report = run_micropython_report(setup, heap_kb=HEAP_KB, modules=("agent", "board"), timeout_s=180,
                                    steps=steps)
    lines = report["stdout"].strip().split("\n")
    assert lines == ["challenge %s dev-1" % nonce.hex(), "ok session viewer alice 3600",
                     "- device dev-1|- version 0|ok",
                     "err forbidden reboot needs role technician, grant has viewer",
                     "ok bye", "5 False"], report["stdout"]
    print("\nESP32 console driver on MicroPython: %d passes, heap peak %d bytes (budget %d)"
          % (len(steps), report["heap_peak_bytes"], HEAP_KB * 1024))
