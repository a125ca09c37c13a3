# Actions the agent core returns for the driver to carry out, in order.

from agent.value import Value


class Action(Value):
    __slots__ = ()


class Append(Action):
    """Append bytes to a named file on board storage (a power cut may tear it)."""
    __slots__ = ("name", "data")

    def __init__(self, name, data):
        self.name = name
        self.data = data


class WriteAtomic(Action):
    """Replace a named file on board storage, all or nothing."""
    __slots__ = ("name", "data")

    def __init__(self, name, data):
        self.name = name
        self.data = data


class Connect(Action):
    """Open the transport (TLS + MQTT CONNECT); answer with Connected or ConnectionLost."""
    __slots__ = ()


class Publish(Action):
    """Publish at QoS 1; answer with PubAcked(token) when the PUBACK arrives."""
    __slots__ = ("topic", "payload", "token")

    def __init__(self, topic, payload, token):
        self.topic = topic
        self.payload = payload
        self.token = token


class Log(Action):
    """Something worth telling a person; code is machine-readable."""
    __slots__ = ("code", "detail")

    def __init__(self, code, detail):
        self.code = code
        self.detail = detail


class MakeKey(Action):
    """Make a new device key in keystore slot `name` (replacing any key there)
    and a CSR signed by it; answer with KeyMade(name, csr_der). With reuse,
    a key already in the slot is kept (a claim asked again after a reboot
    must ask for the same key: the cloud may have certified it already)."""
    __slots__ = ("name", "reuse")

    def __init__(self, name, reuse=False):
        self.name = name
        self.reuse = reuse


class Sign(Action):
    """Sign a SHA-256 digest with the key in slot `name`; answer with Signed."""
    __slots__ = ("name", "digest")

    def __init__(self, name, digest):
        self.name = name
        self.digest = digest


class UseIdentity(Action):
    """From now on connect with this identity: the key in slot `name` and
    certificate `cert` (DER); name None means the factory claim certificate
    on the provisioning endpoint. Drop the current connection if it uses
    another identity. Answer with Connected, Refused or ConnectionLost."""
    __slots__ = ("name", "cert")

    def __init__(self, name, cert):
        self.name = name
        self.cert = cert


class DeleteKey(Action):
    """Erase the key in slot `name`: it is no longer needed."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name
