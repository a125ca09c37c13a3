"""What the rollout engine (cloud/rollout.py) asks its transport to do: small values."""

from agent.value import Value


class Offer(Value):
    """Tell `device` to update to `release` (the transport sends the bundle, serves chunks)."""
    __slots__ = ("device", "release", "rollout")

    def __init__(self, device, release, rollout):
        self.device = device
        self.release = release
        self.rollout = rollout


class Cancel(Value):
    """Withdraw an offer: stop serving `release` to `device`, do not offer it again."""
    __slots__ = ("device", "release", "rollout", "reason")

    def __init__(self, device, release, rollout, reason):
        self.device = device
        self.release = release
        self.rollout = rollout
        self.reason = reason
