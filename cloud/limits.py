"""Token-bucket rate limits per device and per tenant.

The clock is passed in (ms), so tests and the simulator replay exactly.
Memory is bounded: each `TokenBuckets` tracks at most `max_buckets` keys
and evicts the least recently used one when a new key arrives. An evicted
key starts again with a full bucket; that is lossless when the evicted
bucket had been idle for burst/rate seconds (it would be full again
anyway), and otherwise gives that key at most one extra burst.
"""

from collections import OrderedDict


class TokenBuckets:
    """One bucket per key: `burst` tokens at most, refilled at `rate_per_s`."""

    def __init__(self, rate_per_s, burst, max_buckets):
        if rate_per_s <= 0 or burst < 1 or max_buckets < 1:
            raise ValueError("need rate_per_s > 0, burst >= 1, max_buckets >= 1")
        self.rate_per_ms = rate_per_s / 1000.0
        self.burst = burst
        self.max_buckets = max_buckets
        self._buckets = OrderedDict()  # key -> [tokens, last_ms]

    def __len__(self):
        return len(self._buckets)

    def tokens(self, key, now_ms):
        """Tokens available to `key` now (refills and marks it recently used)."""
        bucket = self._bucket(key, now_ms)
        return bucket[0]

    def take(self, key, now_ms, cost=1):
        """Spend `cost` tokens if there are that many; True if spent."""
        bucket = self._bucket(key, now_ms)
        if bucket[0] < cost:
            return False
        bucket[0] -= cost
        return True

    def spend(self, key, cost=1):
        """Spend without checking; call only right after `tokens()` said yes."""
        self._buckets[key][0] -= cost

    def _bucket(self, key, now_ms):
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(self.burst), now_ms]
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
            return bucket
        self._buckets.move_to_end(key)
        elapsed_ms = now_ms - bucket[1]
        if elapsed_ms > 0:  # a clock that goes back refills nothing
            bucket[0] = min(float(self.burst),
                            bucket[0] + elapsed_ms * self.rate_per_ms)
            bucket[1] = now_ms
        return bucket


class Limits:
    """A record passes only if both its device and its tenant have a token;
    it then spends one of each. A refusal spends nothing."""

    def __init__(self, device_rate_per_s, device_burst, tenant_rate_per_s,
                 tenant_burst, max_devices=100_000, max_tenants=10_000):
        self.devices = TokenBuckets(device_rate_per_s, device_burst, max_devices)
        self.tenants = TokenBuckets(tenant_rate_per_s, tenant_burst, max_tenants)

    def check(self, tenant, device, now_ms):
        """None if allowed (tokens spent), else "device" or "tenant"."""
        device_key = (tenant, device)
        if self.devices.tokens(device_key, now_ms) < 1:
            return "device"
        if self.tenants.tokens(tenant, now_ms) < 1:
            return "tenant"
        self.devices.spend(device_key)
        self.tenants.spend(tenant)
        return None
