import pytest

from pipeline.faults import FaultConfigError, FaultPlan, InjectedFatalError


def test_no_switch_means_no_fault():
    assert FaultPlan.from_env({}) == FaultPlan()
    assert FaultPlan.from_env({"ZIMAGE_FAULT": ""}).kind is None


def test_switch_is_refused_outside_test_mode():
    with pytest.raises(FaultConfigError, match="test-only .* ZIMAGE_TEST_MODE is not 1; refusing to start"):
        FaultPlan.from_env({"ZIMAGE_FAULT": "hang@1"})
    with pytest.raises(FaultConfigError):
        FaultPlan.from_env({"ZIMAGE_FAULT": "hang@1", "ZIMAGE_TEST_MODE": "yes"})


@pytest.mark.parametrize(("spec", "plan"), [
    ("hang@3", FaultPlan("hang", 3)), ("fatal@1", FaultPlan("fatal", 1)), ("spawn-child", FaultPlan("spawn-child")),
])
def test_known_faults_parse_in_test_mode(spec, plan):
    assert FaultPlan.from_env({"ZIMAGE_FAULT": spec, "ZIMAGE_TEST_MODE": "1"}) == plan


@pytest.mark.parametrize("spec", ["hang", "hang@0", "fatal@x", "explode@1", "spawn-child@2"])
def test_unknown_or_malformed_faults_are_refused(spec):
    with pytest.raises(FaultConfigError, match="not a known fault"):
        FaultPlan.from_env({"ZIMAGE_FAULT": spec, "ZIMAGE_TEST_MODE": "1"})


def test_fatal_fires_only_at_its_step():
    plan = FaultPlan("fatal", 2)
    plan.at_step(1)
    with pytest.raises(InjectedFatalError, match="step 2"):
        plan.at_step(2)
    plan.at_step(3)
