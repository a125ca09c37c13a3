"""The cloud's check of a release before anyone may deploy it.

The same code a device runs (agent.manifest: key set signed by the root,
k distinct current release signers, strict manifest, chunk by chunk then
whole payload), under the cloud's trust settings, plus what only the cloud
knows: which hardware classes it serves, the security and key-set versions
its fleet has already confirmed (a release below them would be refused by
every device that took the newer one), and how long the release must stay
valid for a rollout to finish.
"""

import hashlib

from agent import cose
from agent import manifest as mf
from agent.errors import RemoteError
from cloud.firmware import check_payload
from cloud.rollout_plan import RolloutError

MIN_VALIDITY_S_DEFAULT = 30 * 86400


def release_id(hw_class, version):
    return "%s-%s" % (hw_class, version)


def check_release(bundle, payload, trust, floors, now_s, min_validity_s=MIN_VALIDITY_S_DEFAULT):
    """A release record (dict) for bundle + payload, or RolloutError with the refusal's code.

    trust: {"root": 65 bytes, "k": int, "hw_classes": [..]}
    floors: {"security_version": int, "keyset_version": int} the fleet of
    this hardware class has confirmed (0, 0 when none).
    """
    try:
        manifest = mf.verify_release(bundle, trust["root"], trust["k"], 0)
        check_payload(manifest, payload)
    except RemoteError as e:                 # ManifestError, CBORError
        raise RolloutError("release refused: %s" % e.message, e.code) from None
    if manifest.hw_class not in trust["hw_classes"]:
        raise RolloutError("hardware class %r is not one this cloud serves (%s)"
                           % (manifest.hw_class, ", ".join(trust["hw_classes"])), "unknown_hw_class")
    floor = floors.get(manifest.hw_class, {"security_version": 0, "keyset_version": 0})
    if manifest.security_version < floor["security_version"]:
        raise RolloutError("security version %d is below %d, which the %s fleet has confirmed"
                           % (manifest.security_version, floor["security_version"], manifest.hw_class),
                           "downgrade")
    if manifest.keyset_version < floor["keyset_version"]:
        raise RolloutError("key set version %d is older than %d, which the %s fleet has accepted"
                           % (manifest.keyset_version, floor["keyset_version"], manifest.hw_class),
                           "keyset_rollback")
    if manifest.expires_s < now_s + min_validity_s:
        raise RolloutError("manifest expires at %d, less than %d s from now (%d)"
                           % (manifest.expires_s, min_validity_s, now_s), "expires_soon")
    return {"id": release_id(manifest.hw_class, manifest.version), "hw_class": manifest.hw_class,
            "version": manifest.version, "security_version": manifest.security_version,
            "keyset_version": manifest.keyset_version, "expires_s": manifest.expires_s,
            "rollout_tag": manifest.rollout_id, "size": manifest.size,
            "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
            "signers": _signers(bundle)}



def _signers(bundle):
    _, envelopes = mf.decode_bundle(bundle)
    kids = []
    for message in envelopes:
        _, protected, unprotected, _, _ = cose.decode1(message)
        kids.append(protected.get(cose.LABEL_KID, unprotected.get(cose.LABEL_KID)).hex())
    return sorted(kids)
