"""agent.updater with a paged manifest (images over 1.75 MiB sign pages of
chunk hashes, agent/manifest.py): page p is asked for and checked before
the chunks it covers, in a download and in the resume scan; a bad page is
refused like a tampered chunk; the read-back checks pages from the chunks
it reads and downloads a bad page again from its first chunk; power cuts at
every write converge with 0 bricks.

The release is 1.1.0 of 300 chunks (3 pages, the last short) under the
test keys of firmware-images/, on the sim board's slots (tests/test_updater.py's
Device and drive)."""

import random

import pytest

from agent import manifest as mf, updater as up
from board.slots import SimSlots
from cloud import firmware
from simulator import firmware_faults as ff
from test_updater import NOW_MS, PER_CHUNK, CONFIG, Device, SimRig, chunks, converged, drive, image_version

COUNT = 2 * mf.PAGE_CHUNKS + 44
BUNDLE, PAYLOAD = ff.build_release("sim-v1", "1.1.0", 2, size=COUNT * 4096 - 100, pages=True)
TABLE = firmware.chunk_table(PAYLOAD)
PARTS = chunks(PAYLOAD)


def page(p):
    return TABLE[p * mf.PAGE_BYTES:(p + 1) * mf.PAGE_BYTES]


# The power-cut sweeps run a smaller release: one full page and a short one.
SWEEP_BUNDLE, SWEEP_PAYLOAD = ff.build_release("sim-v1", "1.1.0", 2, size=140 * 4096, pages=True)


class PagedRig(SimRig):
    """The sim board whose new image is a paged release."""

    def __init__(self, seed=7, slots_class=SimSlots, payload=PAYLOAD):
        SimRig.__init__(self, seed=seed, slots_class=slots_class)
        self.flash.capacity_bytes = 4 << 20     # two slots of 1.2 MB and the record
        self.payload = payload

    def version(self, slot):
        data = self.slots.read_slot(slot)
        if data[:len(self.payload)] == self.payload and not data[len(self.payload):].strip(b"\xff"):
            return "1.1.0"
        return image_version(data)


def device(config=CONFIG, cut_at=(), seed=7, slots_class=SimSlots, payload=PAYLOAD):
    d = Device(cut_at=cut_at, rig=PagedRig(seed, slots_class, payload), config=config)
    d.power_on()
    return d


def go(d, bundle=BUNDLE, payload=PAYLOAD, **kw):
    return drive(d, bundle=bundle, payload=payload, steps_max=5000, **kw)


def offer(d):
    d.feed(up.Offer(BUNDLE, NOW_MS, "rel-p"))
    assert d.state == up.PAGING and d.page_requests == [0] and d.requests == []


def serve_chunks(d, upto):
    """Serve the chunk requests while downloading, up to chunk `upto` (excluded)."""
    while d.state == up.DOWNLOADING and d.requests and d.requests[0] < upto:
        i = d.requests.pop(0)
        d.feed(up.Chunk(i, PARTS[i]))


def test_a_paged_update_asks_for_each_page_before_its_chunks():
    d = device()
    asked = []
    real_run = d.run

    def run(actions):
        asked.extend(("page", a.index) if isinstance(a, up.RequestPage) else ("chunk", a.index)
                     for a in actions if isinstance(a, (up.RequestPage, up.RequestChunk)))
        return real_run(actions)

    d.run = run
    go(d)
    assert d.state == up.CONFIRMED
    assert [r[0] for r in d.reports] == ["downloading", "verified", "installed", "trial", "confirmed"]
    want = []
    for i in range(COUNT):
        if i % mf.PAGE_CHUNKS == 0:
            want.append(("page", i // mf.PAGE_CHUNKS))
        want.append(("chunk", i))
    assert asked == want
    assert d.slots.read_slot(1)[:len(PAYLOAD)] == PAYLOAD
    assert d.boot_state().manifest == b""


@pytest.mark.parametrize("change, code", [
    (lambda p: p[:-1] + bytes([p[-1] ^ 1]), "tampered_page"),
    (lambda p: p[:-32], "bad_page"),
    (lambda p: p + b"\0" * 32, "bad_page"),
    (lambda p: b"", "bad_page"),
])
def test_a_bad_page_is_refused_and_the_running_slot_kept(change, code):
    d = device()
    offer(d)
    d.page_requests.pop(0)
    d.feed(up.Page(0, page(0)))
    serve_chunks(d, mf.PAGE_CHUNKS)
    assert d.state == up.PAGING and d.page_requests == [1]
    d.feed(up.Page(1, change(page(1))))
    assert d.state == up.REJECTED
    assert d.reports[-1][:2] == ("rejected", code)
    b = d.boot_state()
    assert (b.phase, b.active, b.reason) == (up.REJECTED, 0, code)
    assert d.rig.version(0) == "1.0.0"


def test_a_page_of_another_release_is_refused():
    """The page hash is signed: a page of another image's table does not pass."""
    _, other = ff.build_release("sim-v1", "1.2.0", 3, size=len(PAYLOAD), pages=True)
    d = device()
    offer(d)
    d.feed(up.Page(0, firmware.chunk_table(other)[:mf.PAGE_BYTES]))
    assert d.reports[-1][:2] == ("rejected", "tampered_page")


def test_a_late_page_and_a_page_while_downloading_are_ignored():
    d = device()
    offer(d)
    d.feed(up.Page(1, page(1)))              # not the one asked for: a late answer
    assert d.state == up.PAGING
    d.feed(up.Page(0, page(0)))
    assert d.state == up.DOWNLOADING and d.requests == [0]
    d.feed(up.Page(0, page(0)))              # again: ignored while downloading
    assert d.state == up.DOWNLOADING


def test_a_tampered_chunk_is_refused_with_its_page_held():
    d = device()
    go(d, tamper=130)
    assert d.state == up.REJECTED and d.reports[-1][:2] == ("rejected", "tampered_chunk")
    assert d.rig.version(0) == "1.0.0"


def test_the_offer_again_while_paging_asks_for_the_page_again():
    d = device()
    offer(d)
    d.page_requests.clear()                  # the request was lost (offline)
    d.feed(up.Offer(BUNDLE, NOW_MS, "rel-p"))
    assert d.page_requests == [0] and d.state == up.PAGING


def test_a_cancel_while_paging_abandons_the_download():
    d = device()
    offer(d)
    d.feed(up.Cancel("rel-p"))
    assert d.state == up.REJECTED and d.reports[-1][:2] == ("rejected", "cancelled")
    assert d.rig.version(0) == "1.0.0"


@pytest.mark.parametrize("config", [CONFIG, PER_CHUNK], ids=["cursor16", "cursor1"])
def test_a_reboot_mid_page_asks_for_the_page_then_scans_from_the_cursor(config):
    d = device(config=config)
    offer(d)
    d.feed(up.Page(d.page_requests.pop(0), page(0)))
    serve_chunks(d, mf.PAGE_CHUNKS)
    d.feed(up.Page(d.page_requests.pop(0), page(1)))
    serve_chunks(d, 150)
    persisted = d.boot_state().cursor
    assert persisted == (150 if config is PER_CHUNK else 144)
    d.power_on()                             # the page is in memory only: asked for again
    assert d.state == up.PAGING and d.page_requests == [1]
    d.feed(up.Page(1, page(1)))
    scanned = []
    while d.reads:
        scanned.append(d.reads[0].offset // 4096)
        d.answer_read()
    assert scanned == list(range(persisted, 151))   # 150 is not there: the scan stops at it
    assert d.state == up.DOWNLOADING and d.requests == [150]
    go(d)
    assert d.state == up.CONFIRMED
    assert d.slots.read_slot(1)[:len(PAYLOAD)] == PAYLOAD


def test_a_resume_scan_crossing_a_page_asks_for_the_next_page():
    d = device(config=PER_CHUNK)
    offer(d)
    d.feed(up.Page(d.page_requests.pop(0), page(0)))
    serve_chunks(d, mf.PAGE_CHUNKS)
    d.feed(up.Page(d.page_requests.pop(0), page(1)))
    serve_chunks(d, 130)
    b = d.boot_state()
    d.slots.write_boot_state(b.copy(cursor=120).encode())   # as if the cursor lagged behind
    d.power_on()
    assert d.page_requests == [0]
    d.feed(up.Page(d.page_requests.pop(0), page(0)))
    while d.reads:
        d.answer_read()
    assert d.state == up.PAGING and d.page_requests == [1]  # chunks 120..127 were there
    d.feed(up.Page(d.page_requests.pop(0), page(1)))
    while d.reads:
        d.answer_read()
    assert d.state == up.DOWNLOADING and d.requests == [130]


class CorruptSlots(SimSlots):
    """Chunk 200 reads back with one bit flipped, `times` times."""
    times = 1

    def read_slot(self, slot, offset=0, length=None):
        data = SimSlots.read_slot(self, slot, offset, length)
        if slot == 1 and offset == 200 * 4096 and length == 4096 and CorruptSlots.times:
            CorruptSlots.times -= 1
            data = bytes([data[0] ^ 1]) + data[1:]
        return data


def test_the_read_back_finds_a_bad_page_and_downloads_it_again_from_its_first_chunk():
    CorruptSlots.times = 1
    d = device(slots_class=CorruptSlots)
    asked = []
    real_run = d.run

    def run(actions):
        asked.extend(a for a in actions if isinstance(a, (up.RequestPage, up.RequestChunk)))
        return real_run(actions)

    d.run = run
    go(d)
    assert d.state == up.CONFIRMED and d.boot_state().repairs == 1
    first = [i for i, a in enumerate(asked) if a == up.RequestChunk(COUNT - 1)][0]
    again = asked[first + 1:]
    # page 1 is checked when its last chunk (255) is read: from its first chunk, page first
    assert again[:2] == [up.RequestPage(1), up.RequestChunk(mf.PAGE_CHUNKS)]
    assert again[-1] == up.RequestChunk(COUNT - 1)


@pytest.mark.parametrize("healthy", [True, False])
def test_power_cut_at_every_write_of_a_paged_update(healthy):
    sweep = dict(bundle=SWEEP_BUNDLE, payload=SWEEP_PAYLOAD)
    clean = device(payload=SWEEP_PAYLOAD)
    go(clean, healthy=healthy, **sweep)
    total = clean.total_writes()
    assert total > 140
    outcomes = {}
    for n in range(1, total + 1):
        d = device(cut_at=[n], seed=n, payload=SWEEP_PAYLOAD)
        go(d, healthy=healthy, **sweep)
        assert d.power_cuts == 1, n
        converged(d, healthy)
        outcomes[d.state] = outcomes.get(d.state, 0) + 1
    if healthy:
        assert outcomes[up.CONFIRMED] > outcomes.get(up.ROLLED_BACK, 0) > 0


@pytest.mark.parametrize("seed", range(4))
def test_power_cuts_at_random_points_of_a_paged_update(seed):
    rng = random.Random(seed)
    healthy = rng.random() < 0.7
    cuts = sorted(set(rng.randint(1, COUNT + 40) for _ in range(rng.randint(2, 5))))
    d = device(cut_at=cuts, seed=seed, config=PER_CHUNK)
    go(d, healthy=healthy)
    converged(d, healthy)
