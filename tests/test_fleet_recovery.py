"""A fleet device whose certificate expires while its network is down comes
back by itself: its identity core notices, it proves the old key on the
claim endpoint and gets a new certificate, and telemetry resumes; nothing
it sampled meanwhile is lost. Real agent cores, real mTLS, the embedded
broker."""

from agent import telemetry
from cloud.service import Cloud
from simulator.fleet import Fleet
from simulator.provision_drill import ProvisionDrill
from simulator.verify import summarize


async def test_a_fleet_device_recovers_an_identity_that_expired_offline(tmp_path):
    cloud = Cloud(tmp_path / "cloud")
    await cloud.start()
    try:
        drill = ProvisionDrill(cloud, 3, seed=2, approval_every=0, short_every=1, short_cert_s=10)
        creds = await drill.run()
        assert len(creds) == 3
        # Reconnect backoff capped at 2 s, so a recovered device is back well
        # within its next (10 s) certificate's life.
        fleet = Fleet(creds, cloud.ca_path, cloud.host, cloud.port, seed=2,
                      config=telemetry.Config(backoff_cap_ms=2000))
        fleet.claim = (cloud.endpoints(), drill.claim)
        first = {d.identity: d.id_core.record["a"]["cert"] for d in fleet.devices}
        fleet.start()
        # Offline from 1 s to 14 s: every certificate (10 s from enrollment) expires meanwhile.
        await fleet.run_for(22, [(1, fleet.cut_network), (14, fleet.restore_network)])
        drained = await fleet.drain(timeout_s=30)
        await cloud.ingest.stats()
        summary = summarize(fleet, cloud.store, fleet.elapsed_s(), drained)
        connected = fleet.connected()
        await fleet.close()
        assert [c for c in summary["checks"] if not c["passed"]] == []
        assert summary["telemetry"]["lost"] == 0 and connected == 3
        assert all(d.recoveries >= 1 for d in fleet.devices), [d.recoveries for d in fleet.devices]
        assert all(d.id_core.record["a"]["cert"] != first[d.identity] for d in fleet.devices)
        assert cloud.provisioning.counts()["recovered"] >= 3
    finally:
        await cloud.stop()
