# Firmware manifests, release key sets and k-of-n release signatures.
#
# Portable (MicroPython and CPython), no I/O. Three formats, all
# deterministic CBOR (agent.cbor) with text keys; docs/firmware-signing.md
# has the tables.
#
#   manifest = parse(payload)                     # strict, or ManifestError
#   check(manifest, hw_class, security_version, now_s)
#   manifest = verify_release(bundle, root_public_key, k, keyset_version_seen)
#   v = ChunkVerifier(manifest); v.update(0, chunk0); ...; v.finish()
#
# Chunk hashes: a manifest of up to CHUNKS_MAX chunks (1.75 MiB) lists the
# SHA-256 of each 4 KiB chunk ("chunks"). A larger one lists the SHA-256 of
# each "page" instead ("pages"): page p is the chunk hashes of chunks
# 128p..128p+127 laid end to end (4 KiB; the last page shorter), so a page
# is a slice of cloud.firmware.chunk_table(payload). The device fetches page p (any
# transport: its hash is signed) before the chunks it covers and holds one
# page beside one chunk: memory stays bounded up to SIZE_MAX (224 MiB).
#
# A bundle is {"v": 1, "keyset": COSE_Sign1 by the root key over a key set,
# "sigs": [COSE_Sign1 by a release key over the manifest, ...]}. Every
# envelope must verify, each by a distinct key of the set, all over the same
# manifest bytes, and there must be at least k of them. The key set lists
# {kid: public key}, the kids it revokes and its version (monotonic); a set
# older than one the device has seen is refused. The external AAD differs
# for key sets and manifests, so a signature made for one is never accepted
# as the other.
#
# Every refusal is a ManifestError with a code (listed in
# docs/firmware-signing.md); bytes that are not CBOR raise CBORError.

import hashlib

from agent import cbor, cose
from agent.errors import LocalError, RemoteError
from agent.p256 import SignatureError, parse_public_key

FORMAT_VERSION = 1
CHUNK_BYTES = 4096
CHUNKS_MAX = 448                        # a signed manifest stays under cose's 16 KiB
INLINE_SIZE_MAX = CHUNKS_MAX * CHUNK_BYTES  # 1.75 MiB: the largest payload with "chunks"
DIGEST_BYTES = 32
PAGE_CHUNKS = 128                       # chunk hashes per page ...
PAGE_BYTES = PAGE_CHUNKS * DIGEST_BYTES  # ... 4 KiB, one chunk buffer
PAGES_MAX = 448                         # page hashes in a manifest (the same 16 KiB bound)
PAGED_CHUNKS_MAX = PAGES_MAX * PAGE_CHUNKS   # 57,344
SIZE_MAX = PAGED_CHUNKS_MAX * CHUNK_BYTES    # 224 MiB: the largest payload with "pages"
HW_CLASS_CHARS_MAX = 32
VERSION_CHARS_MAX = 32
ROLLOUT_CHARS_MAX = 64
SECURITY_VERSION_END = 1 << 32
TIME_END = 1 << 40                      # seconds since the Unix epoch
KID_BYTES = 8                           # first 8 bytes of SHA-256 of the public key
KEYS_MAX = 16
REVOKED_MAX = 64
SIGNERS_MAX = 8
BUNDLE_BYTES_MAX = 65536
AAD_KEYSET = b"tether-keyset-v1"
AAD_MANIFEST = b"tether-manifest-v1"

_NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
_VERSION_CHARS = _NAME_CHARS + "+"
_MANIFEST_FIELDS = ("v", "hw", "ver", "sv", "size", "sha256", "chunks", "exp", "rollout")
_PAGED_FIELDS = ("v", "hw", "ver", "sv", "size", "sha256", "pages", "exp", "rollout")
_KEYSET_FIELDS = ("v", "ver", "keys", "revoked")
_BUNDLE_FIELDS = ("v", "keyset", "sigs")


class ManifestError(RemoteError):
    code = "manifest"


def fingerprint(public_key):
    """The kid of a release or root key: SHA-256 of its 65 bytes, first 8 bytes."""
    return hashlib.sha256(public_key).digest()[:KID_BYTES]


def chunk_count(size):
    return (size + CHUNK_BYTES - 1) // CHUNK_BYTES


def page_count(chunks):
    return (chunks + PAGE_CHUNKS - 1) // PAGE_CHUNKS


def page_bytes(chunks, page):
    """Length of page `page` of a payload of `chunks` chunks."""
    return (min(PAGE_CHUNKS, chunks - page * PAGE_CHUNKS)) * DIGEST_BYTES



# ---------------------------------------------------------------- manifest

class Manifest:
    """A parsed manifest. chunk_hashes is one bytes of 32 per chunk, in
    order; a paged manifest has page_hashes (32 per page) instead, and
    chunk_hashes None."""

    def __init__(self, hw_class, version, security_version, size, sha256,
                 chunk_hashes, expires_s, rollout_id, page_hashes=None):
        self.hw_class = hw_class
        self.version = version
        self.security_version = security_version
        self.size = size
        self.sha256 = sha256
        self.chunk_hashes = chunk_hashes
        self.page_hashes = page_hashes
        self.paged = page_hashes is not None
        self.expires_s = expires_s
        self.rollout_id = rollout_id
        self.keyset_version = None      # set by verify_release

    def chunk_count(self):
        return chunk_count(self.size)

    def page_hash(self, page):
        return self.page_hashes[page * DIGEST_BYTES:(page + 1) * DIGEST_BYTES]

    def array(self):
        """("chunks" or "pages", the digests end to end)."""
        return ("pages", self.page_hashes) if self.paged else ("chunks", self.chunk_hashes)

    def to_map(self, chunks=True):
        fields = {"v": FORMAT_VERSION, "hw": self.hw_class, "ver": self.version,
                  "sv": self.security_version, "size": self.size, "sha256": self.sha256,
                  "exp": self.expires_s, "rollout": self.rollout_id}
        if chunks:
            name, digests = self.array()
            fields[name] = [digests[i:i + DIGEST_BYTES] for i in range(0, len(digests), DIGEST_BYTES)]
        return fields

    def encode(self):
        """The deterministic CBOR bytes (what release keys sign)."""
        return cbor.dumps(self.to_map())


def parse(payload):
    """A Manifest from its CBOR bytes, every field checked; ManifestError if not."""
    fields = _load_map(payload, cose.MESSAGE_BYTES_MAX, "manifest", "malformed")
    paged = "pages" in fields
    _check_fields(fields, _PAGED_FIELDS if paged else _MANIFEST_FIELDS, "manifest")
    _check_format_version(fields)
    size = _uint(fields, "size", 1, (SIZE_MAX if paged else INLINE_SIZE_MAX) + 1)
    name = "pages" if paged else "chunks"
    digests = fields[name]
    want = page_count(chunk_count(size)) if paged else chunk_count(size)
    if not isinstance(digests, list):
        raise ManifestError("manifest %s must be an array" % name, "bad_field")
    if len(digests) != want:
        raise ManifestError("manifest has %d %s hashes for %d bytes (want %d)"
                            % (len(digests), name[:-1], size, want), "chunk_count")
    what = name[:-1] + " hash"          # once: not a string per hash (a small heap)
    for digest in digests:
        _check_bstr(digest, DIGEST_BYTES, what)
    digests = b"".join(digests)
    manifest = Manifest(
        _text(fields, "hw", HW_CLASS_CHARS_MAX, _NAME_CHARS),
        _text(fields, "ver", VERSION_CHARS_MAX, _VERSION_CHARS),
        _uint(fields, "sv", 0, SECURITY_VERSION_END),
        size,
        _check_bstr(fields["sha256"], DIGEST_BYTES, "sha256"),
        None if paged else digests,
        _uint(fields, "exp", 0, TIME_END),
        _text(fields, "rollout", ROLLOUT_CHARS_MAX, _NAME_CHARS),
        digests if paged else None,
    )
    digests = fields = None
    if not _is_canonical(manifest, payload):
        raise ManifestError("manifest is not in deterministic CBOR form", "not_canonical")
    return manifest


def _is_canonical(manifest, payload):
    """True if payload is manifest.encode(), compared without encoding the
    chunk hashes again (on a small heap that re-encoding was the biggest
    allocation of an update). The decoder has refused non-shortest heads and
    indefinite lengths, so the array of n 32-byte strings has one form, n *
    34 bytes; what is compared with a fresh encoding is everything around
    it: the map's head, the other fields and the order of all keys."""
    fields = manifest.to_map(chunks=False)
    name, digests = manifest.array()
    count = len(digests) // DIGEST_BYTES
    keys = sorted(list(fields) + [name], key=cbor.dumps)   # the deterministic order
    at = keys.index(name)
    before = cbor.dumps(dict((k, fields[k]) for k in keys[:at]))[1:]     # [1:]: a small map's head
    after = cbor.dumps(dict((k, fields[k]) for k in keys[at + 1:]))[1:]
    array_head = bytearray(cbor.dumps(count))
    array_head[0] |= 0x80                                        # major type 0 -> 4 (array)
    start = bytes([0xA0 | len(keys)]) + before + cbor.dumps(name) + array_head
    end = len(payload) - len(after)
    return (end == len(start) + count * (DIGEST_BYTES + 2)
            and payload[:len(start)] == start and payload[end:] == after)


def check(manifest, hw_class, current_security_version, now_s):
    """Refuse a manifest this device must not install (after its signatures verified)."""
    if manifest.hw_class != hw_class:
        raise ManifestError("manifest is for hardware class %r, this is %r"
                            % (manifest.hw_class, hw_class), "wrong_hw_class")
    if manifest.security_version < current_security_version:
        raise ManifestError("security version %d is below the device's %d"
                            % (manifest.security_version, current_security_version), "downgrade")
    if now_s >= manifest.expires_s:
        raise ManifestError("manifest expired at %d (now %d)" % (manifest.expires_s, now_s), "expired")


# ---------------------------------------------------------------- streaming payload check

class ChunkVerifier:
    """Checks the payload chunk by chunk, in order, before each chunk is written.

    update(index, data) raises ManifestError unless data is chunk `index`
    exactly as the manifest hashes it; finish() checks that every chunk came
    and (with whole=True) the SHA-256 of the whole payload. State is a few
    integers and one running hash. After any error every call raises
    `failed`. next_index > 0 resumes a stream at that chunk (only with
    whole=False: a hash state cannot be resumed).

    A paged manifest: with whole=False, page_needed() names the page the
    next chunk needs, and load_page(p, data) checks it against the manifest
    and holds it (one page at a time). With whole=True (the read-back: the
    whole payload from chunk 0) no page is loaded: each page's hash is
    computed from the chunks' and checked as its last chunk passes, so a
    mismatch is known per page. Either way repair_from is, after a
    refusal, the first chunk not known good.
    """

    def __init__(self, manifest, whole=True, next_index=0):
        if whole and next_index:
            raise LocalError("a whole-payload hash cannot start mid-stream", "bad_resume")
        if not 0 <= next_index <= manifest.chunk_count():
            raise LocalError("resume index %d is outside the payload" % next_index, "bad_resume")
        self.manifest = manifest
        self.next_index = next_index
        self.finished = False
        self.error = None
        self.repair_from = None
        self._whole = hashlib.sha256() if whole else None
        # The hot path (update) reads these instead of calling into manifest.
        self._closed = False                # finished, or failed
        self._count = manifest.chunk_count()
        self._last_bytes = manifest.size - (self._count - 1) * CHUNK_BYTES
        self._hashes = manifest.chunk_hashes    # the loaded page, when paged
        self._base = 0                      # chunk index of _hashes' first hash
        self._end = self._count             # chunks below this can be checked now
        self._page_hash = None              # paged read-back: this page's running hash
        if manifest.paged:
            if whole:
                self._page_hash = hashlib.sha256()
            else:
                self._hashes, self._end = None, 0
        self._last = self._count - 1
        self._plain = not whole and self._page_hash is None

    def page_needed(self):
        """The page to load before the next chunk, or None."""
        if self.next_index < self._end or self.next_index >= self._count or self._closed:
            return None
        return self.next_index // PAGE_CHUNKS

    def load_page(self, page, data):
        """Hold page `page` (the next one needed) after checking its hash."""
        if self._closed:
            self._usable()
        if page is None or page != self.page_needed():
            raise LocalError("page %r is not the one needed (%r)" % (page, self.page_needed()),
                             "bad_page_use")
        want = page_bytes(self._count, page)
        self.repair_from = page * PAGE_CHUNKS
        if len(data) != want:
            self._fail(ManifestError("page %d has %d bytes, expected %d" % (page, len(data), want),
                                     "bad_page"))
        if _sha256(data).digest() != self.manifest.page_hash(page):
            self._fail(ManifestError("page %d does not match its hash" % page, "tampered_page"))
        self.repair_from = None
        self._hashes = data if isinstance(data, bytes) else bytes(data)
        self._base = page * PAGE_CHUNKS
        self._end = min(self._base + PAGE_CHUNKS, self._count)

    def resumed_at(self, index):
        """A new verifier of chunk hashes only from chunk `index`, holding
        this one's page if that covers `index` (it was checked on loading)."""
        verifier = ChunkVerifier(self.manifest, whole=False, next_index=index)
        if self.manifest.paged and self._hashes is not None and self._base <= index < self._end:
            verifier._hashes, verifier._base, verifier._end = self._hashes, self._base, self._end
        return verifier

    def update(self, index, data):
        """Accept chunk `index` (bytes, bytearray or memoryview), or raise."""
        if self._closed:
            self._usable()
        if (index != self.next_index or index >= self._end
                or len(data) != (CHUNK_BYTES if index < self._last else self._last_bytes)):
            self._refuse(index, len(data))
        if self._plain:                     # the download's path: one hash, one compare
            at = (index - self._base) << 5  # * DIGEST_BYTES
            if _sha256(data).digest() != self._hashes[at:at + 32]:
                self._tampered(index)
        else:
            self._check(index, data)
        self.next_index = index + 1

    @property
    def received_bytes(self):
        return min(self.next_index * CHUNK_BYTES, self.manifest.size)

    def _check(self, index, data):
        """update()'s check with the whole-payload hash or a paged read-back."""
        digest = _sha256(data).digest()
        if self._page_hash is not None:
            self._page_digest(index, digest)
        elif digest != self._hashes[index << 5:(index + 1) << 5]:
            self._tampered(index)
        if self._whole is not None:
            self._whole.update(data)

    def _tampered(self, index):
        self.repair_from = index
        self._fail(ManifestError("chunk %d does not match its hash" % index, "tampered_chunk"))

    def _page_digest(self, index, digest):
        self._page_hash.update(digest)
        if (index + 1) % PAGE_CHUNKS and index + 1 < self._count:
            return
        page = index // PAGE_CHUNKS
        if self._page_hash.digest() != self.manifest.page_hash(page):
            self.repair_from = page * PAGE_CHUNKS
            self._fail(ManifestError("chunks %d..%d do not match page %d's hash"
                                     % (page * PAGE_CHUNKS, index, page), "tampered_chunk"))
        self._page_hash = hashlib.sha256()

    def finish(self):
        self._usable()
        m = self.manifest
        if self.next_index != self._count:
            self._fail(ManifestError("payload ended after %d of %d bytes"
                                     % (self.received_bytes, m.size), "truncated"))
        if self._whole is not None and self._whole.digest() != m.sha256:
            self._fail(ManifestError("payload SHA-256 differs from the manifest", "payload_hash"))
        self.finished = self._closed = True

    def _usable(self):
        if self.error is not None:
            raise ManifestError("verifier failed earlier (%s)" % self.error.code, "failed")
        if self.finished:
            raise ManifestError("verifier already finished", "failed")

    def _fail(self, error):
        self.error = error
        self._closed = True
        raise error

    def _refuse(self, index, n):
        """The first thing wrong with chunk `index` of n bytes, raised."""
        count = self._count
        if index >= count:
            self._fail(ManifestError("chunk %d is beyond the payload's %d chunks"
                                     % (index, count), "oversized"))
        if index != self.next_index:
            self._fail(ManifestError("chunk %d arrived, expected %d" % (index, self.next_index),
                                     "out_of_order"))
        if index >= self._end:
            raise LocalError("chunk %d needs page %d, not loaded" % (index, index // PAGE_CHUNKS),
                             "page_needed")
        want = min(CHUNK_BYTES, self.manifest.size - index * CHUNK_BYTES)
        # A paged read-back has checked nothing of this page yet: from its start.
        self.repair_from = index if self._page_hash is None else index - index % PAGE_CHUNKS
        self._fail(ManifestError("chunk %d has %d bytes, expected %d" % (index, n, want),
                                 "oversized" if n > want else "truncated"))


_sha256 = hashlib.sha256



# ---------------------------------------------------------------- release key set

class KeySet:
    """version, keys {kid: 65-byte public key}, revoked [kid, ...]."""

    def __init__(self, version, keys, revoked):
        self.version = version
        self.keys = keys
        self.revoked = revoked


def parse_keyset(payload):
    """A KeySet from its CBOR bytes (already verified under the root key)."""
    fields = _load_map(payload, cose.MESSAGE_BYTES_MAX, "key set", "bad_keyset")
    _check_fields(fields, _KEYSET_FIELDS, "key set", "bad_keyset")
    _check_format_version(fields, "bad_keyset")
    version = _uint(fields, "ver", 0, SECURITY_VERSION_END, "bad_keyset")
    pairs = _sorted_list(fields["keys"], 1, KEYS_MAX, "keys")
    revoked = _sorted_list(fields["revoked"], 0, REVOKED_MAX, "revoked")
    keys = {}
    for pair in pairs:
        kid, public_key = pair
        _check_release_key(kid, public_key)
        keys[kid] = public_key
    for kid in revoked:
        _check_bstr(kid, KID_BYTES, "revoked kid", "bad_keyset")
        if kid in keys:
            raise ManifestError("kid %s is both listed and revoked" % cose.kid_text(kid), "bad_keyset")
    return KeySet(version, keys, revoked)


def _sorted_list(items, count_min, count_max, what):
    """items, checked: a list of count_min..count_max entries, strictly ascending."""
    if not isinstance(items, list) or not count_min <= len(items) <= count_max:
        raise ManifestError("key set %s must be an array of %d..%d entries"
                            % (what, count_min, count_max), "bad_keyset")
    for i in range(len(items)):
        if what == "keys" and (not isinstance(items[i], list) or len(items[i]) != 2):
            raise ManifestError("key set keys must be [kid, public key] pairs", "bad_keyset")
        if i and not _sort_key(items[i - 1]) < _sort_key(items[i]):
            raise ManifestError("key set %s must be sorted by kid, no repeats" % what, "bad_keyset")
    return items


def _sort_key(item):
    key = item[0] if isinstance(item, list) else item
    if not isinstance(key, bytes):
        raise ManifestError("a kid must be a byte string", "bad_keyset")
    return key


def _check_release_key(kid, public_key):
    _check_bstr(kid, KID_BYTES, "kid", "bad_keyset")
    try:
        parse_public_key(public_key)
    except SignatureError as error:
        raise ManifestError("key set key %s: %s" % (cose.kid_text(kid), error.message), "bad_keyset")
    if fingerprint(public_key) != kid:
        raise ManifestError("kid %s is not the fingerprint of its key" % cose.kid_text(kid), "bad_keyset")


# ---------------------------------------------------------------- k-of-n release signatures

def verify_release(bundle, root_public_key, k, keyset_version_seen=0):
    """The Manifest of a bundle signed by at least k distinct current release keys.

    Checks signatures only; call check() next. The returned manifest's
    keyset_version is the set's version: persist it once the update is
    installed, and pass it as keyset_version_seen from then on. Its
    signed_bytes are the manifest bytes the signatures cover (keep those,
    not a re-encoding).
    """
    verifier = ReleaseVerifier(bundle, root_public_key, k, keyset_version_seen)
    while not verifier.step():
        pass
    return verifier.result()


class ReleaseVerifier:
    """verify_release in bounded pieces: call step() until it returns True,
    then result(). Each step does at most bits_per_step bits of one ECDSA
    verification, or the parsing between two of them."""

    def __init__(self, bundle, root_public_key, k, keyset_version_seen=0, bits_per_step=256):
        if type(k) is not int or not 1 <= k <= SIGNERS_MAX:
            raise LocalError("k must be 1..%d, not %r" % (SIGNERS_MAX, k), "bad_k")
        if not isinstance(root_public_key, (bytes, bytearray)):
            raise LocalError("root public key must be bytes", "bad_root_key")
        self._work = self._verify(bundle, bytes(root_public_key), k, keyset_version_seen,
                                  bits_per_step)
        self._manifest = None
        self._error = None

    def step(self):
        """Do one piece; True when finished. Raises the refusal, every time."""
        if self._error is not None:
            raise self._error
        if self._manifest is not None:
            return True
        try:
            next(self._work)
        except StopIteration:
            pass
        except RemoteError as error:
            self._error = error
            raise
        return self._manifest is not None

    def result(self):
        if self._manifest is None:
            raise LocalError("release verification is not finished", "unfinished")
        return self._manifest

    def _verify(self, bundle, root, k, seen, bits):
        # Drop each piece once used (bundle, key set, envelopes): a small heap
        # holds only what the remaining steps need.
        keyset_message, envelopes = decode_bundle(bundle)
        bundle = None
        payload, verifier = _start(keyset_message, {fingerprint(root): root}, AAD_KEYSET,
                                   "keyset_signature")
        keyset_message = None
        yield from _run(verifier, bits, "keyset_signature")
        keyset = parse_keyset(payload)
        if keyset.version < seen:
            raise ManifestError("key set version %d is older than %d, already seen"
                                % (keyset.version, seen), "keyset_rollback")
        payload = None
        yield
        signers = []
        while envelopes:                # one per step: each decode's garbage goes between
            signers.append(_signer(envelopes.pop(0), keyset, signers))
            yield
        if len(signers) < k:
            raise ManifestError("%d release signatures, %d required" % (len(signers), k),
                                "too_few_signers")
        first = envelopes = None
        while signers:
            kid, message = signers.pop(0)
            payload, verifier = _start(message, {kid: keyset.keys[kid]}, AAD_MANIFEST,
                                       "bad_signature")
            message = None
            # Only a digest of the first payload is kept to compare the
            # others with: the heap holds one copy of the manifest, the last.
            digest = hashlib.sha256(payload).digest()
            if first is None:
                first = digest
            elif digest != first:
                raise ManifestError("signatures are over different manifests", "mismatch")
            if signers:
                payload = None
            yield from _run(verifier, bits, "bad_signature")
        manifest_bytes = payload
        yield                           # parsing a long chunk list is a piece of its own
        manifest = parse(manifest_bytes)
        manifest.keyset_version = keyset.version
        manifest.signed_bytes = manifest_bytes      # what the signatures cover, as they cover it
        self._manifest = manifest


def decode_bundle(bundle):
    """(key set message, [signature envelopes]): the bundle's shape only, nothing verified."""
    fields = _load_map(bundle, BUNDLE_BYTES_MAX, "bundle", "malformed")
    _check_fields(fields, _BUNDLE_FIELDS, "bundle")
    _check_format_version(fields)
    envelopes = fields["sigs"]
    if not isinstance(fields["keyset"], bytes):
        raise ManifestError("bundle keyset must be a byte string", "malformed")
    if not isinstance(envelopes, list) or not 1 <= len(envelopes) <= SIGNERS_MAX:
        raise ManifestError("bundle sigs must be an array of 1..%d" % SIGNERS_MAX, "malformed")
    for message in envelopes:
        if not isinstance(message, bytes):
            raise ManifestError("each signature must be a byte string", "malformed")
    return fields["keyset"], envelopes


def _signer(message, keyset, signers):
    """(kid, message): the envelope's signer is current, and not one of signers'."""
    try:
        _, protected, unprotected, _, _ = cose.decode1(message)
    except SignatureError as error:
        raise ManifestError("signature envelope: %s" % error.message, "malformed")
    kid = protected.get(cose.LABEL_KID, unprotected.get(cose.LABEL_KID))
    if kid in keyset.revoked:
        raise ManifestError("signer %s is revoked by key set %d" % (cose.kid_text(kid), keyset.version),
                            "revoked_signer")
    if not isinstance(kid, bytes) or kid not in keyset.keys:
        raise ManifestError("signer %s is not in key set %d" % (cose.kid_text(kid), keyset.version),
                            "unknown_signer")
    for other, _ in signers:
        if other == kid:
            raise ManifestError("signer %s signed twice" % cose.kid_text(kid), "duplicate_signer")
    return kid, message


def _start(message, keys, aad, code):
    try:
        return cose.start1(message, keys, aad)
    except SignatureError as error:
        raise ManifestError("%s (%s)" % (error.message, error.code), code)


def _run(verifier, bits, code):
    """Yield after every verifier.step(bits), so each step() is one bounded piece."""
    yield                               # after the parsing and set-up of this one
    done = False
    while not done:
        done = verifier.step(bits)
        yield
    if not verifier.result():
        raise ManifestError("signature does not verify", code)


# ---------------------------------------------------------------- field checks

def _load_map(data, bytes_max, what, code):
    if not isinstance(data, (bytes, bytearray)):
        raise ManifestError("%s must be bytes" % what, code)
    if len(data) > bytes_max:
        raise ManifestError("%s of %d bytes is over %d" % (what, len(data), bytes_max), code)
    fields = cbor.loads(data)
    if not isinstance(fields, dict):
        raise ManifestError("%s must be a CBOR map" % what, code)
    return fields


def _check_fields(fields, names, what, code=None):
    for name in names:
        if name not in fields:
            raise ManifestError("%s has no %r" % (what, name), code or "missing_field")
    if len(fields) != len(names):
        for name in fields:
            if name not in names:
                raise ManifestError("%s has unknown field %r" % (what, name),
                                    code or "unknown_field")


def _check_format_version(fields, code="bad_format_version"):
    if type(fields["v"]) is not int or fields["v"] != FORMAT_VERSION:
        raise ManifestError("format version %r, expected %d" % (fields["v"], FORMAT_VERSION), code)


def _uint(fields, name, low, end, code="bad_field"):
    value = fields[name]
    if type(value) is not int or not low <= value < end:
        raise ManifestError("%s must be an integer in %d..%d" % (name, low, end - 1), code)
    return value


def _text(fields, name, chars_max, allowed):
    value = fields[name]
    if not isinstance(value, str) or not 1 <= len(value) <= chars_max:
        raise ManifestError("%s must be text of 1..%d characters" % (name, chars_max), "bad_field")
    for c in value:
        if c not in allowed:
            raise ManifestError("%s has a character outside [A-Za-z0-9._-]" % name, "bad_field")
    return value


def _check_bstr(value, length, what, code="bad_field"):
    if not isinstance(value, bytes) or len(value) != length:
        raise ManifestError("%s must be a byte string of %d bytes" % (what, length), code)
    return value
