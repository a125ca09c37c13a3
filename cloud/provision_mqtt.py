"""The provisioning service on MQTT: two clients of the cloud's broker
(embedded or Mosquitto, the same code for both).

- "$cloud/claims" on the provisioning listener (claim CA): subscribes to
  prov/+/+/req, answers on prov/<claim>/<hwid>/resp.
- "$cloud/provisioner" on the device listener (device CA): subscribes to
  t/+/+/enroll (rotation requests and confirmations), answers on
  t/<tenant>/<device>/cert.

The broker's ACL has already checked that a request's topic belongs to the
certificate that sent it (docs/identity.md), so the topic names the
sender. Decisions are cloud/provision.py's; this only carries bytes, on its
own database connection (paho's threads, one lock).
"""

import logging
import ssl
import threading

import paho.mqtt.client as mqtt

from cloud.ca import CLAIMS_IDENTITY, PROVISIONER_IDENTITY
from cloud.identity import Registry
from cloud.provision import ProvisionError, Provisioning

log = logging.getLogger("tether.provision")

START_TIMEOUT_S = 10.0


class _Client:
    def __init__(self, name, host, port, cafile, cert, key, topic, handler, client_id=None):
        self.name = name
        self.topic = topic
        self.handler = handler
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or name,
                                  clean_session=True, protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=cafile, certfile=cert, keyfile=key,
                            cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.reconnect_delay_set(0.2, 5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subscribed.set()
        self.client.on_message = self._on_message
        self.host, self.port = host, port

    def start(self):
        self.client.connect_async(self.host, self.port, 30)
        self.client.loop_start()

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("%s refused by the broker: %s", self.name, reason_code)
            return
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, msg):
        try:
            reply = self.handler(msg.topic, msg.payload)
        except Exception:  # one bad request must not stop the service
            log.exception("%s failed on %s", self.name, msg.topic)
            return
        if reply is not None:
            client.publish(reply[0], reply[1], qos=1)


class ProvisionService:
    def __init__(self, db_path, ca, host, device_port, prov_port, cafile,
                 device_cred, claim_cred, cert_s=None, claims_client_id=None):
        self.registry = Registry(db_path)
        kwargs = {} if cert_s is None else {"cert_s": cert_s}
        self.prov = Provisioning(self.registry, ca, **kwargs)
        self.lock = threading.Lock()
        self.requests = 0
        self.clients = [
            # Both listeners present the broker's certificate from the device CA.
            _Client(CLAIMS_IDENTITY, host, prov_port, cafile, claim_cred[0], claim_cred[1],
                    "prov/+/+/req", self._claim, client_id=claims_client_id),
            _Client(PROVISIONER_IDENTITY, host, device_port, cafile, device_cred[0], device_cred[1],
                    "t/+/+/enroll", self._device),
        ]

    async def start(self, timeout_s=START_TIMEOUT_S):
        import asyncio
        for c in self.clients:
            c.start()
        loop = asyncio.get_running_loop()
        for c in self.clients:
            if not await loop.run_in_executor(None, c.subscribed.wait, timeout_s):
                await self.stop()
                raise ProvisionError("%s not subscribed within %.0f s" % (c.name, timeout_s),
                                     "provision_service")

    async def stop(self):
        import asyncio
        loop = asyncio.get_running_loop()
        for c in self.clients:
            await loop.run_in_executor(None, c.stop)
        self.registry.close()

    def _claim(self, topic, payload):
        _, claim, hwid, _ = topic.split("/")
        with self.lock:
            self.requests += 1
            answer = self.prov.on_claim(claim, hwid, payload)
        return None if answer is None else ("prov/%s/%s/resp" % (claim, hwid), answer)

    def _device(self, topic, payload):
        _, tenant, device, _ = topic.split("/")
        identity = "%s/%s" % (tenant, device)
        with self.lock:
            self.requests += 1
            answer = self.prov.on_device(identity, payload)
        return None if answer is None else ("t/%s/cert" % identity, answer)
