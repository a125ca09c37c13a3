# One error hierarchy for the cloud side. Every error carries a short,
# machine-readable code; the message is for people. Same shape as
# agent/errors.py so a caller can log `err.code` whichever side raised.


class CloudError(Exception):
    code = "cloud"

    def __init__(self, message, code=None):
        Exception.__init__(self, message)
        if code is not None:
            self.code = code
        self.message = message


class IdentityError(CloudError):
    """A tenant id, device id or certificate identity is not well formed."""
    code = "bad_identity"


class CAError(CloudError):
    """The certificate authority cannot be created, loaded or used."""
    code = "ca"


class BrokerError(CloudError):
    """The embedded broker cannot start, stop or serve."""
    code = "broker"


class MosquittoError(CloudError):
    """Mosquitto cannot be configured, started or reached."""
    code = "mosquitto"


class IngestError(CloudError):
    """The ingest did not accept a message; the broker must not acknowledge it."""
    code = "ingest"
