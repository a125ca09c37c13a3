"""`tether cloud serve`: the reference cloud until interrupted."""

import asyncio
import logging
import os
import signal

from cloud.service import Cloud


async def serve(args):
    cloud = Cloud(args.data, host=args.host, port=args.port, broker=args.broker, prov_port=args.prov_port,
                  fw_http_port=args.fw_http_port or None)
    if args.issue:
        tenants = tuple("tenant%d" % i for i in range(max(1, args.tenants)))
        cloud.issue_devices(args.issue, tenants=tenants)
    await cloud.start()
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
    return 0


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(args))
