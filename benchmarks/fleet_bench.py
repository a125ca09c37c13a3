"""Fleet benchmark: N virtual tether agents against the reference cloud on
Mosquitto, and N plain paho-mqtt clients against the same Mosquitto as the
baseline, in one run.

    .venv/bin/python benchmarks/fleet_bench.py --agents 1000 \
        [--seconds 20] [--interval 0.05] [--json OUT]

It measures the code as it is: the Mosquitto ingest acknowledges each
record after its group commit (cloud/mosquitto.py), and the simulator gives
each TLS connection a 16 KiB read buffer (simulator.fleet.small_tls_buffers).
--tls-read-buffer 262144 restores asyncio's own 256 KiB, for comparison.

What runs where:

- the parent process holds the reference cloud's Python side (the ingest:
  paho subscriber thread, group-commit worker thread, SQLite store) on its
  own event loop in its own thread, and the tether fleet (the real agent
  core on simulated flash, one mTLS connection per agent, all on one
  asyncio loop) on the main thread. Mosquitto is a separate process. All of
  it shares the machine's cores.
- the heap probe (tracemalloc) and the paho baseline run in child
  processes of this script, so their memory figures start from a clean
  process.

Figures (see benchmarks/README.md and docs/benchmarks.md):

1. connects/s: N / time from fleet.start() until every agent has its
   CONNACK (sampling held back until then).
2. acked/s and stored/s: agents sample every --interval s (offered load
   N/interval msgs/s) for --seconds; PUBACKs received and rows committed to
   the SQLite store during that window, divided by its length. Then the
   fleet drains, the store is given --store-wait s to catch up, and
   simulator.verify.summarize reconciles device truth with the store.
3. memory per agent: process RSS (/proc/self/status VmRSS, VmHWM) before
   the fleet exists, with all connected and at the peak, divided by N;
   the probe child adds the Python heap per agent (tracemalloc) and the
   RSS of one client SSLContext.
4. baseline: N paho-mqtt 2.x clients (CallbackAPIVersion.VERSION2), each
   with its own device certificate, in ONE thread on a selectors loop
   (client.socket(), loop_read(), loop_write(), loop_misc()), QoS 1, the
   same payload at the same offered rate. No store-and-forward, no storage,
   and no cloud subscriber (the ingest's session is removed first).
"""

import argparse
import asyncio
import collections
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import selectors
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

KB = 1024


# -- process facts ------------------------------------------------------------

def raise_nofile():
    """Soft RLIMIT_NOFILE up to the hard limit (children and Mosquitto inherit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def proc_status():
    """{'rss_kb': VmRSS, 'hwm_kb': VmHWM} of this process."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                out["hwm_kb"] = int(line.split()[1])
    return out


def reset_hwm():
    """Reset VmHWM to the current RSS (Linux >= 4.0: clear_refs '5')."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid="self", tid=None):
    """utime + stime of a process (or one of its threads) in seconds, or None."""
    path = "/proc/%s/task/%s/stat" % (pid, tid) if tid else "/proc/%s/stat" % pid
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    """CPU used by this process, its main thread and Mosquitto between two
    points, as cores (CPU seconds / wall seconds)."""

    def __init__(self, mosquitto_pid=None):
        self.pids = {"process": ("self", None), "main_thread": ("self", threading.get_native_id())}
        if mosquitto_pid:
            self.pids["mosquitto"] = (mosquitto_pid, None)
        self.start()

    def start(self):
        self.t = time.monotonic()
        self.cpu = {k: cpu_s(*v) for k, v in self.pids.items()}

    def cores(self):
        wall = time.monotonic() - self.t
        out = {}
        for k, v in self.pids.items():
            now, then = cpu_s(*v), self.cpu[k]
            out[k] = round((now - then) / wall, 2) if now is not None and then is not None and wall > 0 else None
        return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def malloc_in_use_kb():
    """Bytes the C heap (glibc malloc: OpenSSL, large Python objects) has handed
    out, in KB, or None where mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    m = fn()
    return (m.uordblks + m.hblkhd) // KB


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
    except OSError:
        pass
    from cloud.mosquitto import find_mosquitto
    mosq = find_mosquitto()
    mosq_version = "?"
    if mosq:
        try:
            out = subprocess.run([mosq, "-h"], capture_output=True, text=True, timeout=5)
            mosq_version = (out.stdout or out.stderr).splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    import paho.mqtt
    code = None
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "agent", "board", "cloud",
                                "simulator"], capture_output=True, text=True, timeout=5)
        if head.returncode == 0:
            code = head.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "code": code,
        "cpu": model, "nproc": os.cpu_count(), "mem_total_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION, "mosquitto": mosq_version, "paho_mqtt": paho.mqtt.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def per(n, s):
    return round(n / s, 1) if s else None


def ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


# -- the cloud, on its own loop in its own thread -------------------------------

class CloudHost:
    """Runs cloud.service.Cloud on a loop of its own (a thread), or on the
    caller's loop with shared=True (as `tether demo` does)."""

    def __init__(self, cloud, shared=False):
        self.cloud = cloud
        self.shared = shared
        self.loop = None
        self.thread = None

    async def call(self, coro):
        if self.shared:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def start(self):
        if not self.shared:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, name="bench-cloud", daemon=True)
            self.thread.start()
        await self.call(self.cloud.start())

    async def stop_ingest(self):
        """Stop consuming and commit what was accepted; Mosquitto stays up."""
        if self.cloud.mosquitto_ingest is not None:
            await self.call(self.cloud.mosquitto_ingest.stop())
        if self.cloud.ingest is not None:
            await self.call(self.cloud.ingest.close())

    async def stop(self):
        try:
            if self.loop is not None or self.shared:
                await self.call(self.cloud.stop())
        finally:
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(10)
                self.loop.close()
                self.loop = None


def clear_ingest_session(cloud):
    """Connect once as $cloud/ingest with clean_session=True: Mosquitto forgets
    the ingest's subscription and whatever it still queued for it."""
    import paho.mqtt.client as mqtt
    from cloud.ca import INGEST_IDENTITY
    idir = os.path.join(cloud.data_dir, "ingest")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=INGEST_IDENTITY,
                    clean_session=True, protocol=mqtt.MQTTv311)
    c.tls_set(ca_certs=cloud.ca_path, certfile=os.path.join(idir, "client.crt"),
              keyfile=os.path.join(idir, "client.key"), cert_reqs=ssl.CERT_REQUIRED,
              tls_version=ssl.PROTOCOL_TLS_CLIENT)
    done = threading.Event()
    c.on_connect = lambda *a: done.set()
    c.connect(cloud.host, cloud.port, 30)
    deadline = time.monotonic() + 10
    while not done.is_set() and time.monotonic() < deadline:
        c.loop(0.1)
    c.disconnect()
    c.loop(0.1)
    return done.is_set()


def mosquitto_log(cloud, needle):
    """Lines of Mosquitto's log that contain `needle`."""
    path = cloud.mosquitto.log_path if cloud.mosquitto is not None else None
    if not path or not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return [line.strip() for line in f if needle in line]


def mosquitto_drops(cloud):
    """Lines in Mosquitto's log saying it dropped messages queued for a client."""
    return mosquitto_log(cloud, "being dropped")


def ingest_counts(cloud):
    """Records the Mosquitto ingest has received and acknowledged so far
    (received - acked: waiting for their group commit)."""
    mi = cloud.mosquitto_ingest
    if mi is None:
        return {}
    return {"ingest_received": mi.received, "ingest_acked": mi.acked, "ingest_failures": mi.failures}


def wipe_run_state(data_dir):
    """A reused --data dir keeps CA and credentials; the store and Mosquitto's
    persistence start empty, so sequence numbers never collide."""
    for name in ("tether.db", "tether.db-wal", "tether.db-shm"):
        p = os.path.join(data_dir, name)
        if os.path.exists(p):
            os.remove(p)
    db = os.path.join(data_dir, "mosquitto", "db")
    if os.path.isdir(db):
        shutil.rmtree(db)


# -- the tether fleet ---------------------------------------------------------------

class GcTimer:
    """Time the cyclic garbage collector spends, by generation (gc.callbacks)."""

    def __init__(self):
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._t = None

    def __call__(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            g = info["generation"]
            self.seconds[g] += time.perf_counter() - self._t
            self.count[g] += 1
            self._t = None

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)

    def as_dict(self):
        return {"seconds": round(sum(self.seconds), 2), "by_generation_s": [round(x, 3) for x in self.seconds],
                "collections": self.count}


class StoreCounter:
    """Rows in the store's telemetry table, from a connection of our own (WAL
    lets it read while the ingest writes)."""

    def __init__(self, path):
        self.db = sqlite3.connect(path, timeout=5)

    def __call__(self):
        try:
            return self.db.execute("SELECT count(*) FROM telemetry").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    def close(self):
        self.db.close()


async def wait_connected(n, count, timeout_s, t0=None, poll_s=0.002):
    """Poll count() until n; -> (seconds since t0, curve of (t, connected) every ~100 ms)."""
    t0 = time.monotonic() if t0 is None else t0
    curve, next_mark = [], 0.0
    while True:
        c = count()
        t = time.monotonic() - t0
        if t >= next_mark or c >= n:
            curve.append((round(t, 3), c))
            next_mark = t + 0.1
        if c >= n or t > timeout_s:
            return t, curve
        await asyncio.sleep(poll_s)


async def run_tether(args, host, creds):
    from simulator.fleet import Fleet
    from simulator.verify import summarize

    cloud = host.cloud
    loop = asyncio.get_running_loop()
    n = len(creds)
    gc.collect()
    mem0 = proc_status()
    malloc0 = malloc_in_use_kb()
    reset_hwm()

    t = time.monotonic()
    fleet = Fleet(creds, cloud.ca_path, cloud.host, cloud.port, seed=args.seed,
                  sample_interval_s=args.interval)
    ctor_s = time.monotonic() - t
    tls_buffer = tls_read_buffer(args.tls_read_buffer)
    mem_ctor = proc_status()
    log("tether: %d agents built in %.2f s (one SSLContext each); TLS read buffer %d B; connecting"
        % (n, ctor_s, tls_buffer))

    # 1. connects: sampling held back until every agent has its CONNACK.
    mosq_pid = cloud.mosquitto.pid if cloud.mosquitto is not None else None
    cpu = CpuMeter(mosq_pid)
    t0 = time.monotonic()
    fleet.start()
    fleet.sampling = False      # the sample timers start() set fire and stop
    connect_s, curve = await wait_connected(n, lambda: fleet.metrics.connects, args.connect_timeout, t0)
    connect_cpu = cpu.cores()
    connected = fleet.metrics.connects
    mem_conn = proc_status()
    malloc_conn = malloc_in_use_kb()
    log("tether: %d/%d connected in %.2f s (%.0f/s), %d attempts"
        % (connected, n, connect_s, connected / connect_s, fleet.metrics.connect_attempts))

    # 2. sampling window.
    stored = StoreCounter(cloud.store_path)
    profiler = None
    if args.profile:
        import cProfile
        profiler = cProfile.Profile()
    fleet.sampling = True
    for i, dev in enumerate(fleet.devices):
        loop.call_later(args.interval * i / n, fleet._sample_loop, dev)
    w0 = time.monotonic()
    a0, p0, s0 = fleet.metrics.acked, fleet.metrics.published, stored()
    if profiler:
        profiler.enable()
    gc_timer = GcTimer().__enter__()
    cpu.start()
    timeline = []
    end = w0 + args.seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        await asyncio.sleep(min(1.0, end - now))
        timeline.append({"t_s": round(time.monotonic() - w0, 2), "acked": fleet.metrics.acked - a0,
                         "published": fleet.metrics.published - p0, "stored": stored() - s0,
                         "connected": fleet.connected(), "queued": fleet.queued(),
                         "rss_kb": proc_status()["rss_kb"], **ingest_counts(cloud)})
    if profiler:
        profiler.disable()
    gc_timer.__exit__()
    window_cpu = cpu.cores()
    window_s = time.monotonic() - w0
    a1, p1, s1 = fleet.metrics.acked, fleet.metrics.published, stored()
    mem_peak = proc_status()
    log("tether: window %.1f s: %d published, %d acked (%.0f/s), %d stored (%.0f/s)"
        % (window_s, p1 - p0, a1 - a0, (a1 - a0) / window_s, s1 - s0, (s1 - s0) / window_s))

    # drain, then give the store time to catch up.
    t = time.monotonic()
    drained = await fleet.drain(timeout_s=args.drain_timeout)
    drain_s = time.monotonic() - t
    acked_unique = sum(len(d.acked) for d in fleet.devices)
    t = time.monotonic()
    st0 = stored()
    last = st0
    wait_timeline, next_mark = [], 0.0
    while True:
        last = stored()
        waited = time.monotonic() - t
        if waited >= next_mark:
            wait_timeline.append({"t_s": round(waited, 1), "stored": last, "rss_kb": proc_status()["rss_kb"],
                                  **ingest_counts(cloud)})
            next_mark = waited + 5.0
        if last >= acked_unique or waited >= args.store_wait:
            break
        rate = (last - st0) / waited if waited > 0 else 0
        if waited >= 5 and (rate <= 0 or (acked_unique - last) / rate > args.store_wait - waited):
            break   # cannot catch up within --store-wait; the rate is measured
        await asyncio.sleep(0.5)
    store_wait_s = time.monotonic() - t
    idle_rate = per(last - st0, store_wait_s) if st0 < acked_unique else None   # None: nothing to wait for
    log("tether: drained=%s in %.1f s; store %d of %d acknowledged after %.1f s more (ingest %s rows/s "
        "with the fleet idle)" % (drained, drain_s, last, acked_unique, store_wait_s, idle_rate))

    # verification: stop the ingest (commits what it took), then reconcile.
    ingest_received = cloud.mosquitto_ingest.received if cloud.mosquitto_ingest else None
    ingest_failures = cloud.mosquitto_ingest.failures if cloud.mosquitto_ingest else None
    ingest_connects = len(mosquitto_log(cloud, "as $cloud/ingest"))
    await host.stop_ingest()
    stored_final = stored()
    stored.close()
    duration = fleet.elapsed_s()
    summary = summarize(fleet, cloud.store, duration, drained)
    drops = mosquitto_drops(cloud)
    notes = dict(fleet.metrics.notes)
    attempts = fleet.metrics.connect_attempts
    await fleet.close()     # sets fleet.closing: no device reconnects
    result = {
        "agents": n,
        "build_s": round(ctor_s, 2),
        "tls_read_buffer_bytes": tls_buffer,
        "connect": {"connected": connected, "seconds": round(connect_s, 3),
                    "per_s": per(connected, connect_s), "attempts_total": attempts,
                    "cpu_cores": connect_cpu, "curve": curve},
        "window": {"seconds": round(window_s, 2), "offered_per_s": round(n / args.interval, 1),
                   "published": p1 - p0, "acked": a1 - a0, "acked_per_s": per(a1 - a0, window_s),
                   "stored": s1 - s0, "stored_per_s": per(s1 - s0, window_s),
                   "cpu_cores": window_cpu, "gc_in_window": gc_timer.as_dict(), "timeline": timeline},
        "after": {"drained": drained, "drain_s": round(drain_s, 2), "acked_total": acked_unique,
                  "store_wait_s": round(store_wait_s, 2), "stored_total": stored_final,
                  "ingest_idle_rows_per_s": idle_rate,
                  "not_stored": max(0, acked_unique - stored_final),
                  "ingest_received_from_mosquitto": ingest_received,
                  "ingest_failures": ingest_failures,
                  "ingest_connects": ingest_connects,
                  "mosquitto_drop_lines": drops[:5], "store_wait_timeline": wait_timeline},
        "notes": notes,
        "summary_telemetry": summary["telemetry"],
        "checks": summary["checks"],
        "memory": memory_block(n, mem0, mem_ctor, mem_conn, mem_peak, malloc0, malloc_conn),
    }
    if profiler:
        import pstats
        profiler.dump_stats(args.profile)
        st = pstats.Stats(profiler, stream=sys.stderr)
        st.sort_stats("tottime").print_stats(25)
        result["profile"] = args.profile
    return result


def tls_read_buffer(size=None):
    """The per-connection read buffer asyncio's SSLProtocol allocates
    (SSLProtocol.max_size). Fleet() lowers it process-wide to 16 KiB
    (simulator.fleet.small_tls_buffers); --tls-read-buffer sets it back, after
    the Fleet is built and before any connection, to compare (262144 is
    CPython 3.11's own value). -> the size the connections will get."""
    from asyncio import sslproto
    if size:
        sslproto.SSLProtocol.max_size = size
    return sslproto.SSLProtocol.max_size


def memory_block(n, mem0, mem_ctor, mem_conn, mem_peak, malloc0=None, malloc_conn=None):
    out = {
        "rss_before_kb": mem0["rss_kb"], "rss_built_kb": mem_ctor["rss_kb"],
        "rss_connected_kb": mem_conn["rss_kb"], "hwm_peak_kb": mem_peak["hwm_kb"],
        "built_kb_per_agent": round((mem_ctor["rss_kb"] - mem0["rss_kb"]) / n, 1),
        "connected_kb_per_agent": round((mem_conn["rss_kb"] - mem0["rss_kb"]) / n, 1),
        "peak_kb_per_agent": round((mem_peak["hwm_kb"] - mem0["rss_kb"]) / n, 1),
    }
    if malloc0 is not None and malloc_conn is not None:
        out["c_malloc_connected_kb_per_agent"] = round((malloc_conn - malloc0) / n, 1)
    return out


# -- children: heap probe and paho baseline -------------------------------------------

def child_cmd(kind, cfg_path):
    return [sys.executable, os.path.abspath(__file__), "--_child", kind, "--_config", cfg_path]


def run_child(kind, cfg, data_dir, timeout_s):
    path = os.path.join(data_dir, "bench-%s.json" % kind)
    with open(path, "w") as f:
        json.dump(cfg, f)
    proc = subprocess.Popen(child_cmd(kind, path), stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError("%s child did not finish in %d s" % (kind, timeout_s))
    if proc.returncode != 0:
        raise RuntimeError("%s child exited %s" % (kind, proc.returncode))
    return json.loads(out.strip().splitlines()[-1])


def creds_cfg(creds):
    return [[c.tenant, c.device, c.certfile, c.keyfile] for c in creds]


def probe_child(cfg):
    """Python heap per agent (tracemalloc) and RSS of one client SSLContext."""
    import tracemalloc
    from simulator.fleet import Credential, Fleet, client_context
    raise_nofile()
    creds = [Credential(*c) for c in cfg["creds"]]
    m = len(creds)
    ca = cfg["ca"]
    client_context(ca, creds[0].certfile, creds[0].keyfile)   # warm-up: OpenSSL's one-time setup

    # SSLContext alone: RSS of m contexts, each loading the CA and its own key pair.
    gc.collect()
    r0 = proc_status()["rss_kb"]
    t = time.monotonic()
    contexts = [client_context(ca, c.certfile, c.keyfile) for c in creds]
    ctx_s = time.monotonic() - t
    ctx_kb = (proc_status()["rss_kb"] - r0) / m

    async def fleet_part():
        tracemalloc.start(1)
        gc.collect()
        rss0 = proc_status()["rss_kb"]
        s0 = tracemalloc.take_snapshot()
        fleet = Fleet(creds, ca, cfg["host"], cfg["port"], seed=7, sample_interval_s=1.0)
        tls_read_buffer(cfg.get("tls_read_buffer"))
        gc.collect()
        s1 = tracemalloc.take_snapshot()
        rss1 = proc_status()["rss_kb"]
        t0 = time.monotonic()
        fleet.start()
        fleet.sampling = False
        secs, _ = await wait_connected(m, lambda: fleet.metrics.connects, 60, t0)
        await asyncio.sleep(0.5)   # let handshake leftovers settle
        gc.collect()
        s2 = tracemalloc.take_snapshot()
        rss2 = proc_status()["rss_kb"]
        overhead_kb = tracemalloc.get_tracemalloc_memory() / KB
        connected = fleet.metrics.connects
        await fleet.close()
        built = sum(st.size_diff for st in s1.compare_to(s0, "filename"))
        conn = sum(st.size_diff for st in s2.compare_to(s1, "filename"))
        top = []
        for st in s2.compare_to(s0, "lineno")[:10]:
            fr = st.traceback[0]
            top.append({"where": "%s:%d" % (os.path.relpath(fr.filename, ROOT) if fr.filename.startswith(ROOT)
                                            else os.path.basename(fr.filename), fr.lineno),
                        "bytes_per_agent": round(st.size_diff / m)})
        tracemalloc.stop()
        return {"connected": connected, "connect_s": round(secs, 3),
                "heap_built_kb_per_agent": round(built / KB / m, 2),
                "heap_connect_kb_per_agent": round(conn / KB / m, 2),
                "heap_total_kb_per_agent": round((built + conn) / KB / m, 2),
                "rss_built_kb_per_agent": round((rss1 - rss0) / m, 1),
                "rss_connect_kb_per_agent": round((rss2 - rss1) / m, 1),
                "tracemalloc_overhead_kb": round(overhead_kb),
                "top_sites": top}

    out = asyncio.run(fleet_part())
    out.update({"agents": m, "ssl_context_kb_each": round(ctx_kb, 1),
                "ssl_context_ms_each": round(ctx_s * 1000 / m, 3)})
    del contexts
    return out


def baseline_child(cfg):
    """N paho clients, one thread, one selectors loop; QoS 1 at the fleet's rate."""
    import cbor2
    import paho.mqtt.client as mqtt
    raise_nofile()
    creds = cfg["creds"]
    n = len(creds)
    interval = cfg["interval"]
    warm = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="warm-up")   # OpenSSL's one-time setup
    warm.tls_set(ca_certs=cfg["ca"], certfile=creds[0][2], keyfile=creds[0][3],
                 cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    del warm
    gc.collect()
    mem0 = proc_status()
    malloc0 = malloc_in_use_kb()
    reset_hwm()

    state = {"connected": 0, "refused": 0, "acked": 0, "disconnects": 0}

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            state["refused"] += 1
        else:
            state["connected"] += 1

    def on_publish(client, userdata, mid, reason_code, properties):
        state["acked"] += 1

    def on_disconnect(client, userdata, flags, reason_code, properties):
        state["disconnects"] += 1

    t = time.monotonic()
    clients = []
    for tenant, device, certfile, keyfile in creds:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="%s/%s" % (tenant, device),
                        clean_session=True, protocol=mqtt.MQTTv311)
        c.tls_set(ca_certs=cfg["ca"], certfile=certfile, keyfile=keyfile,
                  cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.max_inflight_messages_set(cfg["inflight"])   # the agent's window
        c.on_connect = on_connect
        c.on_publish = on_publish
        c.on_disconnect = on_disconnect
        clients.append(c)
    ctor_s = time.monotonic() - t
    mem_ctor = proc_status()

    sel = selectors.DefaultSelector()
    writing = set()

    def want_write(i):
        c = clients[i]
        if c.want_write() and i not in writing:
            sel.modify(c.socket(), selectors.EVENT_READ | selectors.EVENT_WRITE, i)
            writing.add(i)

    def service(timeout):
        for key, mask in sel.select(timeout):
            i = key.data
            c = clients[i]
            if mask & selectors.EVENT_READ:
                c.loop_read()
                sock = c.socket()
                while sock is not None and getattr(sock, "pending", lambda: 0)():
                    c.loop_read()
            if mask & selectors.EVENT_WRITE and c.socket() is not None:
                c.loop_write()
                if not c.want_write() and c.socket() is not None:
                    sel.modify(c.socket(), selectors.EVENT_READ, i)
                    writing.discard(i)

    # 1. connects: paho's connect() does TCP and the TLS handshake blocking,
    # one client after the other; CONNACKs are read on the shared loop.
    cpu = CpuMeter(cfg.get("mosquitto_pid"))
    t0 = time.monotonic()
    failures = 0
    for i, c in enumerate(clients):
        try:
            c.connect(cfg["host"], cfg["port"], keepalive=60)
        except (OSError, ssl.SSLError):
            failures += 1
            continue
        sel.register(c.socket(), selectors.EVENT_READ, i)
        want_write(i)
        service(0)
    while state["connected"] + state["refused"] < n - failures and time.monotonic() - t0 < cfg["connect_timeout"]:
        service(0.01)
    connect_s = time.monotonic() - t0
    connect_cpu = cpu.cores()
    mem_conn = proc_status()
    malloc_conn = malloc_in_use_kb()

    # 2. the same offered load: every client publishes every `interval` s,
    # staggered, a timer re-armed after each sample (as the fleet does).
    def payload(i, seq):
        # the agent's record for the same readings: same CBOR, same size
        return cbor2.dumps({"v": 1, "k": "t", "d": creds[i][1], "ts": time.time_ns() // 1_000_000,
                            "r": {"temp_c": 15 + (seq % 150) / 10, "rssi_dbm": -40 - seq % 50,
                                  "battery_mv": 3000 + seq % 1200}, "e": 0, "s": seq}, canonical=True)

    topics = ["t/%s/%s/telemetry" % (c[0], c[1]) for c in creds]
    seqs = [0] * n
    cpu.start()
    w0 = time.monotonic()
    due = collections.deque((w0 + interval * i / n, i) for i in range(n))
    published = 0
    a0 = state["acked"]
    end = w0 + cfg["seconds"]
    next_misc = w0 + 1.0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        service(max(0.0, min(due[0][0] - now, end - now, 0.05)))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, i = due.popleft()
            c = clients[i]
            if c.is_connected():
                c.publish(topics[i], payload(i, seqs[i]), qos=1)
                seqs[i] += 1
                published += 1
                want_write(i)
            due.append((now + interval, i))
        if now >= next_misc:
            for c in clients:
                c.loop_misc()
            next_misc = now + 1.0
    window_s = time.monotonic() - w0
    window_cpu = cpu.cores()
    acked = state["acked"] - a0
    mem_peak = proc_status()
    disconnects = state["disconnects"]
    # drain: every outstanding PUBACK
    t = time.monotonic()
    while state["acked"] - a0 < published and time.monotonic() - t < 30:
        service(0.05)
    drain_s = time.monotonic() - t
    for i, c in enumerate(clients):
        if c.socket() is not None:
            c.disconnect()
            c.loop_write()
    for c in clients:
        s = c.socket()
        if s is not None:
            try:
                sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
    return {
        "clients": n, "build_s": round(ctor_s, 2),
        "connect": {"connected": state["connected"], "refused": state["refused"], "failures": failures,
                    "seconds": round(connect_s, 3), "per_s": per(state["connected"], connect_s),
                    "cpu_cores": connect_cpu},
        "window": {"seconds": round(window_s, 2), "offered_per_s": round(n / interval, 1),
                   "published": published, "acked": acked, "acked_per_s": per(acked, window_s),
                   "cpu_cores": window_cpu},
        "after": {"drain_s": round(drain_s, 2), "acked_total": state["acked"] - a0,
                  "unacked": published - (state["acked"] - a0), "disconnects_before_teardown": disconnects},
        "memory": memory_block(n, mem0, mem_ctor, mem_conn, mem_peak, malloc0, malloc_conn),
    }


# -- the run -------------------------------------------------------------------------

async def bench(args):
    import logging
    from cloud.service import Cloud
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    nofile = raise_nofile()
    if nofile[0] != resource.RLIM_INFINITY and nofile[0] < 2 * args.agents + 256:
        log("warning: RLIMIT_NOFILE %d is low for %d agents (2 fds each with Mosquitto in the same "
            "limit); raise the hard limit (ulimit -Hn)" % (nofile[0], args.agents))
    own_dir = args.data is None
    data_dir = tempfile.mkdtemp(prefix="tether-bench-") if own_dir else os.path.abspath(args.data)
    result = {"machine": machine(), "params": {
        "agents": args.agents, "broker": args.broker, "seconds": args.seconds, "interval_s": args.interval,
        "offered_per_s": round(args.agents / args.interval, 1),
        "tls_read_buffer": args.tls_read_buffer,
        "cloud_loop": args.cloud_loop, "rlimit_nofile": nofile[0]}}
    host = None
    try:
        wipe_run_state(data_dir)
        cloud = Cloud(data_dir, broker=args.broker)
        t = time.monotonic()
        creds = cloud.issue_devices(args.agents)
        log("cloud: %d device credentials ready in %.1f s (%s)" % (len(creds), time.monotonic() - t, data_dir))
        host = CloudHost(cloud, shared=args.cloud_loop == "shared")
        await host.start()
        log("cloud: %s up on %s:%d, cloud loop %s" % (args.broker, cloud.host, cloud.port, args.cloud_loop))
        result["tether"] = await run_tether(args, host, creds)

        if args.broker == "mosquitto":
            cleared = await asyncio.get_running_loop().run_in_executor(None, clear_ingest_session, cloud)
            result["tether"]["after"]["ingest_session_cleared"] = cleared

        common = {"host": cloud.host, "port": cloud.port, "ca": cloud.ca_path,
                  "mosquitto_pid": cloud.mosquitto.pid if cloud.mosquitto is not None else None,
                  "tls_read_buffer": args.tls_read_buffer}
        if args.heap_agents:
            m = min(args.heap_agents, len(creds))
            log("probe: tracemalloc heap of %d agents in a child process" % m)
            result["probe"] = run_child("probe", dict(common, creds=creds_cfg(creds[:m])), data_dir, 180)
        if not args.no_baseline:
            log("baseline: %d paho clients in a child process, one thread" % len(creds))
            result["baseline"] = run_child("baseline", dict(
                common, creds=creds_cfg(creds), interval=args.interval, seconds=args.seconds,
                connect_timeout=args.connect_timeout, inflight=8), data_dir, args.seconds + 240)
    finally:
        if host is not None:
            await host.stop()
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    result["ratios"] = ratios(result)
    return result


def add_efficiency(side):
    """CPU cost per connect and per acknowledged message: steadier than the
    rates on a shared machine, since they do not depend on what else ran."""
    c, w = side["connect"], side["window"]
    cc, wc = c.get("cpu_cores") or {}, w.get("cpu_cores") or {}

    def cost(cores, seconds, count, unit):
        return round(cores * seconds / count * unit, 2) if cores is not None and count else None
    side["efficiency"] = {
        "cpu_ms_per_connect": cost(cc.get("process"), c["seconds"], c["connected"], 1e3),
        "mosquitto_cpu_ms_per_connect": cost(cc.get("mosquitto"), c["seconds"], c["connected"], 1e3),
        "cpu_us_per_acked_msg": cost(wc.get("process"), w["seconds"], w["acked"], 1e6),
        "main_thread_cpu_us_per_acked_msg": cost(wc.get("main_thread"), w["seconds"], w["acked"], 1e6),
        "mosquitto_cpu_us_per_acked_msg": cost(wc.get("mosquitto"), w["seconds"], w["acked"], 1e6),
    }


def ratios(result):
    t, b = result.get("tether"), result.get("baseline")
    for side in (t, b):
        if side:
            add_efficiency(side)
    if not t or not b:
        return {}
    te, be = t["efficiency"], b["efficiency"]
    return {
        "cpu_ms_per_connect": ratio(te["cpu_ms_per_connect"], be["cpu_ms_per_connect"]),
        "cpu_us_per_acked_msg": ratio(te["cpu_us_per_acked_msg"], be["cpu_us_per_acked_msg"]),
        "connects_per_s": ratio(t["connect"]["per_s"], b["connect"]["per_s"]),
        "acked_per_s": ratio(t["window"]["acked_per_s"], b["window"]["acked_per_s"]),
        "stored_per_s_vs_baseline_acked": ratio(t["window"]["stored_per_s"], b["window"]["acked_per_s"]),
        "connected_kb_per_agent": ratio(t["memory"]["connected_kb_per_agent"], b["memory"]["connected_kb_per_agent"]),
        "peak_kb_per_agent": ratio(t["memory"]["peak_kb_per_agent"], b["memory"]["peak_kb_per_agent"]),
    }


def report(r):
    t, b, p = r.get("tether"), r.get("baseline"), r.get("probe")
    m = r["machine"]
    lines = ["", "machine: %s, %s cores, %s GB, Linux %s, Python %s, %s, %s, %s" % (
        m["cpu"], m["nproc"], m["mem_total_gb"], m["kernel"], m["python"], m["mosquitto"], m["openssl"], m["date"]),
        "code: %s (%s)" % (m["code"] or "not a git checkout", ROOT),
        "params: %(agents)d agents, %(broker)s, window %(seconds)s s, interval %(interval_s)s s "
        "(offered %(offered_per_s)s msgs/s), cloud loop %(cloud_loop)s" % r["params"]
        + (", fleet TLS read buffer %s B" % t["tls_read_buffer_bytes"] if t else ""),
        ""]
    row = "%-36s %14s %14s %8s"
    lines.append(row % ("", "tether fleet", "paho baseline", "ratio"))

    def g(d, *keys):
        for k in keys:
            if d is None:
                return None
            d = d.get(k)
        return d
    rt = r.get("ratios", {})
    for label, keys, rk in (
            ("new mTLS connects/s", ("connect", "per_s"), "connects_per_s"),
            ("connect time (s)", ("connect", "seconds"), None),
            ("PUBACKs/s in window", ("window", "acked_per_s"), "acked_per_s"),
            ("stored/s in window", ("window", "stored_per_s"), "stored_per_s_vs_baseline_acked"),
            ("RSS KB/agent, connected", ("memory", "connected_kb_per_agent"), "connected_kb_per_agent"),
            ("RSS KB/agent, peak (VmHWM)", ("memory", "peak_kb_per_agent"), "peak_kb_per_agent"),
            ("RSS KB/agent, built (no conn)", ("memory", "built_kb_per_agent"), None),
            ("C malloc KB/agent, connected", ("memory", "c_malloc_connected_kb_per_agent"), None),
            ("CPU ms per connect: this process", ("efficiency", "cpu_ms_per_connect"), "cpu_ms_per_connect"),
            ("CPU ms per connect: mosquitto", ("efficiency", "mosquitto_cpu_ms_per_connect"), None),
            ("CPU us per acked msg: this process", ("efficiency", "cpu_us_per_acked_msg"), "cpu_us_per_acked_msg"),
            ("  of which main thread", ("efficiency", "main_thread_cpu_us_per_acked_msg"), None),
            ("CPU us per acked msg: mosquitto", ("efficiency", "mosquitto_cpu_us_per_acked_msg"), None),
            ("CPU cores, connect: this process", ("connect", "cpu_cores", "process"), None),
            ("CPU cores, connect: mosquitto", ("connect", "cpu_cores", "mosquitto"), None),
            ("CPU cores, window: this process", ("window", "cpu_cores", "process"), None),
            ("CPU cores, window: main thread", ("window", "cpu_cores", "main_thread"), None),
            ("CPU cores, window: mosquitto", ("window", "cpu_cores", "mosquitto"), None)):
        tv, bv = g(t, *keys), g(b, *keys)
        lines.append(row % (label, "-" if tv is None else tv, "-" if bv is None else bv,
                            rt.get(rk, "") if rk else ""))
    if t:
        a = t["after"]
        lines += ["", "tether after the window: drained=%s, %d acknowledged, %d stored after %.1f s more "
                  "(ingest %s rows/s with the fleet idle), %d not stored"
                  % (a["drained"], a["acked_total"], a["stored_total"], a["store_wait_s"],
                     a["ingest_idle_rows_per_s"], a["not_stored"])]
        lines.append("ingest: %s records received from Mosquitto (redeliveries included), %s callback failures, "
                     "%s connections to Mosquitto" % (a["ingest_received_from_mosquitto"], a["ingest_failures"],
                                                      a["ingest_connects"]))
        if a["mosquitto_drop_lines"]:
            lines.append("mosquitto log: " + a["mosquitto_drop_lines"][0])
        lines.append("lost (simulator.verify.summarize): %d" % t["summary_telemetry"]["lost"])
        lines.append("summary telemetry: " + json.dumps(t["summary_telemetry"]))
        failed = [c["name"] for c in t["checks"] if not c["passed"]]
        lines.append("checks: " + ("all passed" if not failed else "FAILED: " + "; ".join(failed)))
        if t["notes"]:
            lines.append("agent notes: " + json.dumps(t["notes"]))
    if p:
        lines += ["", "heap probe (%d agents, tracemalloc): Python heap %.1f KB/agent (built %.1f + connect %.1f); "
                  "RSS built %.1f + connect %.1f KB/agent; one client SSLContext %.1f KB RSS, %.2f ms"
                  % (p["agents"], p["heap_total_kb_per_agent"], p["heap_built_kb_per_agent"],
                     p["heap_connect_kb_per_agent"], p["rss_built_kb_per_agent"], p["rss_connect_kb_per_agent"],
                     p["ssl_context_kb_each"], p["ssl_context_ms_each"])]
        for s in p["top_sites"][:6]:
            lines.append("  %7d B/agent  %s" % (s["bytes_per_agent"], s["where"]))
    if b:
        lines += ["", "baseline: %d/%d connected (%d refused, %d failed), %d published, %d acked in window, "
                  "%d unacked after drain" % (b["connect"]["connected"], b["clients"], b["connect"]["refused"],
                                              b["connect"]["failures"], b["window"]["published"],
                                              b["window"]["acked"], b["after"]["unacked"])]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="N virtual tether agents (real agent core, simulated flash, one mTLS connection each, one "
                    "asyncio loop) against the reference cloud on Mosquitto, and N plain paho-mqtt clients "
                    "against the same Mosquitto as a baseline: new mTLS connects/s, PUBACKs/s and stored/s, "
                    "RSS per agent.")
    ap.add_argument("--agents", type=int, default=1000, help="number of agents and of baseline clients (default 1000)")
    ap.add_argument("--broker", choices=("mosquitto",), default="mosquitto",
                    help="the cloud's broker; only mosquitto (the embedded broker acknowledges only after the "
                         "ingest has stored, so a storage-free baseline against it is not possible)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the sampling window (default 20)")
    ap.add_argument("--interval", type=float, default=0.05,
                    help="seconds between two samples of one agent; offered load = agents/interval (default 0.05)")
    ap.add_argument("--json", metavar="OUT", help="write every figure as JSON to OUT")
    ap.add_argument("--data", metavar="DIR", help="cloud data dir to use and keep (CA and credentials are reused; "
                    "the store and Mosquitto persistence are wiped); default: a temp dir, removed")
    ap.add_argument("--store-wait", type=float, default=30.0,
                    help="after the drain, seconds to wait for the store to hold every acknowledged record; "
                         "stops early once the ingest rate shows it cannot (default 30)")
    ap.add_argument("--drain-timeout", type=float, default=60.0, help="fleet drain timeout (default 60)")
    ap.add_argument("--connect-timeout", type=float, default=60.0,
                    help="give up waiting for all CONNACKs after this many seconds (default 60)")
    ap.add_argument("--heap-agents", type=int, default=200,
                    help="agents in the tracemalloc heap probe child (0: skip; default 200)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the paho baseline")
    ap.add_argument("--tls-read-buffer", type=int, metavar="BYTES",
                    help="comparison only: give the fleet's TLS connections a read buffer of BYTES "
                         "(asyncio SSLProtocol.max_size) instead of the simulator's 16384; 262144 is what "
                         "CPython 3.11 allocates without the simulator's change")
    ap.add_argument("--cloud-loop", choices=("thread", "shared"), default="thread",
                    help="run the cloud's asyncio side on its own loop in a thread (default), or on the fleet's "
                         "loop as `tether demo` does")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the fleet thread during the window, save to FILE "
                    "(slows the fleet: do not quote figures from a profiled run)")
    ap.add_argument("--seed", type=int, default=1, help="the fleet's seed (default 1)")
    ap.add_argument("--_child", choices=("probe", "baseline"), help=argparse.SUPPRESS)
    ap.add_argument("--_config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.agents < 1 or args.seconds <= 0 or args.interval <= 0:
        ap.error("--agents, --seconds and --interval must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._child:
        with open(args._config) as f:
            cfg = json.load(f)
        out = probe_child(cfg) if args._child == "probe" else baseline_child(cfg)
        print(json.dumps(out))
        return 0
    t = time.monotonic()
    result = asyncio.run(bench(args))
    result["wall_s"] = round(time.monotonic() - t, 1)
    print(report(result))
    print("\nwall time %.0f s" % result["wall_s"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
