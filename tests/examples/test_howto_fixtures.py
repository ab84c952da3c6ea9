from __future__ import annotations

from pytest_cmg import Step, TaskSequence


def test_driver_package_is_fetched_on_demand(cloud_dp, cmg, cmg_client):
    cloud_dp.distribute("PS100013", 1, {"drivers/net.inf": b"[Version]"})
    engine = cmg_client()
    result = engine.run(TaskSequence("PS100020", "Drivers",
                                     (Step("Apply drivers", "apply_driver_package", "PS100013"),)))
    assert result.succeeded
    cmg.log.assert_request_made("manifest", count=1, package_id="PS100013")
