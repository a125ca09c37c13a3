# Exponential backoff with jitter, bounded in delay and in attempts counted.
# Randomness is passed in (rng.randint) so a seeded run replays exactly.

ATTEMPTS_MAX = 16  # beyond this the delay is already at its cap


class Backoff:
    def __init__(self, rng, base_ms=500, cap_ms=30000):
        if base_ms <= 0 or cap_ms < base_ms:
            raise ValueError("backoff needs 0 < base_ms <= cap_ms")
        self.rng = rng
        self.base_ms = base_ms
        self.cap_ms = cap_ms
        self.attempts = 0

    def next_delay_ms(self):
        """Delay before the next attempt: half fixed, half random ("equal jitter")."""
        delay = self.base_ms << min(self.attempts, ATTEMPTS_MAX)
        if delay > self.cap_ms:
            delay = self.cap_ms
        if self.attempts < ATTEMPTS_MAX:
            self.attempts += 1
        half = delay // 2
        return half + self.rng.randint(0, delay - half)

    def reset(self):
        self.attempts = 0
