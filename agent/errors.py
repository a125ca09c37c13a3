# One error hierarchy for the agent core. Every error carries a short,
# machine-readable code; the message is for people.


class TetherError(Exception):
    code = "error"

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message


class LocalError(TetherError):
    """We were asked to do something the state machine does not allow."""
    code = "local"


class RemoteError(TetherError):
    """The peer (broker, cloud, storage contents) sent something invalid."""
    code = "remote"


class CBORError(RemoteError):
    code = "cbor"


class MQTTError(RemoteError):
    code = "mqtt"


class JournalError(RemoteError):
    code = "journal"
