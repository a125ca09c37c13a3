"""`tether cloud serve`: the reference cloud until interrupted.

Exit codes: 0 stopped (Ctrl-C or SIGTERM), 1 the cloud could not start for
another reason (printed), 2 usage: a port already in use or not a port, two
endpoints on one port, or a --host that cannot be listened on."""

import asyncio
import errno
import logging
import os
import re
import signal
import socket
import sys

from cloud.service import Cloud

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# (option, attribute): every port `cloud serve` listens on
PORT_OPTIONS = (("--port", "port"), ("--prov-port", "prov_port"), ("--fw-http-port", "fw_http_port"))


AMQTT_LOGGERS = ("amqtt", "amqtt.broker")


class StartError(Exception):
    """Why the cloud cannot start, in one line for the operator."""

    def __init__(self, message, exit_code=EXIT_USAGE):
        Exception.__init__(self, message)
        self.exit_code = exit_code


def check_ports(host, ports):
    """Refuse (StartError) before anything starts: ports is [(option, port)];
    0 means "any free port" (--fw-http-port 0: not served), skipped."""
    seen = {}
    for option, port in ports:
        if not port:
            continue
        if not 0 < port < 65536:
            raise StartError("%s %d is not a TCP port (1..65535)" % (option, port))
        if port in seen:
            raise StartError("%s and %s are both %d: each endpoint needs its own port" % (seen[port], option, port))
        seen[port] = option
        _check_bind(host, port, option)


def _check_bind(host, port, option):
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartError("--host %s: cannot resolve it: %s" % (host, e.strerror)) from None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the servers bind
                s.bind(address)
        except OSError as e:
            raise StartError(_bind_message(host, port, option, e)) from None


def _bind_message(host, port, option, e):
    if e.errno == errno.EADDRINUSE:
        return ("port %d (%s) is already in use on %s: is another cloud running? Stop it, or give "
                "another %s" % (port, option, host, option))
    if e.errno in (errno.EACCES, errno.EPERM):
        return "port %d (%s): permission denied (ports below 1024 need privileges); give another %s" % (
            port, option, option)
    if e.errno == errno.EADDRNOTAVAIL:
        return "--host %s is not an address of this machine" % host
    return "cannot listen on %s port %d (%s): %s" % (host, port, option, e.strerror or e)


def _start_failure(args, cloud, e):
    """A start that failed after the checks (a race for a port, Mosquitto):
    one line, naming the option when the error names one of our ports."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if "in use" in text or "Errno %d]" % errno.EADDRINUSE in text:
        for option, attr in PORT_OPTIONS:
            port = getattr(cloud, attr, None) or getattr(args, attr, None)
            if port and re.search(r"\b%d\b" % port, text):
                return StartError(_bind_message(cloud.host, port, option, OSError(errno.EADDRINUSE, "")))
    return StartError("cannot start: %s" % text, EXIT_FAILED)


class _NoStartupTraceback(logging.Filter):
    def filter(self, record):
        return record.exc_info is None and "startup failed" not in record.getMessage()


async def serve(args):
    check_ports(args.host, [(option, getattr(args, attr)) for option, attr in PORT_OPTIONS])
    cloud = Cloud(args.data, host=args.host, port=args.port, broker=args.broker, prov_port=args.prov_port,
                  fw_http_port=args.fw_http_port or None)
    if args.issue:
        tenants = tuple("tenant%d" % i for i in range(max(1, args.tenants)))
        cloud.issue_devices(args.issue, tenants=tenants)
    quiet = _NoStartupTraceback()
    for name in AMQTT_LOGGERS:           # its own traceback of a failed start: we say it once
        logging.getLogger(name).addFilter(quiet)
    try:
        await cloud.start()
    except Exception as e:           # amqtt's BrokerError, MosquittoError, OSError, ...
        failure = _start_failure(args, cloud, e)
        try:
            await cloud.stop()       # what did start (services, Mosquitto children)
        except Exception:
            pass
        raise failure from None
    finally:
        for name in AMQTT_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)
    print("tether cloud: %s broker on mqtts://%s:%d" % (cloud.kind, cloud.host, cloud.port), flush=True)
    print("  provisioning endpoint (claim certificates): mqtts://%s:%d" % (cloud.host, cloud.prov_port))
    if cloud.fw_http is not None:
        print("  firmware over HTTPS ranges (device certificates): https://%s:%d/fw/<release>"
              % (cloud.host, cloud.fw_http_port))
    print("  CA bundle:   %s" % cloud.ca_path)
    print("  credentials: %s" % os.path.join(cloud.data_dir, "devices"))
    print("  store:       %s" % cloud.store_path, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 10)
            except asyncio.TimeoutError:
                stats = await cloud.stats()
                logging.getLogger("tether.cloud").info(
                    "stored %d, duplicates %d, dead-lettered %d, silent gaps %d", stats.get("stored", 0),
                    stats.get("duplicates_dropped", 0), stats.get("dead_lettered", 0), stats.get("silent_gaps", 0))
    finally:
        await cloud.stop()
        print("tether cloud: stopped", flush=True)
    return EXIT_OK


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args))
    except StartError as e:
        print("tether cloud serve: %s" % e, file=sys.stderr)
        return e.exit_code
