import pytest
import torch

from pipeline.faults import FaultConfigError, FaultPlan


def test_no_switch_means_no_fault():
    assert FaultPlan.from_env({}) == FaultPlan()
    assert FaultPlan.from_env({"ZIMAGE_FAULT": ""}).kind is None


def test_switch_is_refused_outside_test_mode():
    with pytest.raises(FaultConfigError, match="test-only .* ZIMAGE_TEST_MODE is not 1; refusing to start"):
        FaultPlan.from_env({"ZIMAGE_FAULT": "hang@1"})
    with pytest.raises(FaultConfigError):
        FaultPlan.from_env({"ZIMAGE_FAULT": "hang@1", "ZIMAGE_TEST_MODE": "yes"})


@pytest.mark.parametrize(("spec", "plan"), [
    ("hang@3", FaultPlan("hang", 3)), ("poison@1", FaultPlan("poison", 1)), ("oom@2/10", FaultPlan("oom", 2, 10)),
    ("nan@1", FaultPlan("nan", 1)), ("slow@4", FaultPlan("slow", 4)), ("spawn-child", FaultPlan("spawn-child")),
])
def test_known_faults_parse_in_test_mode(spec, plan):
    assert FaultPlan.from_env({"ZIMAGE_FAULT": spec, "ZIMAGE_TEST_MODE": "1"}) == plan


@pytest.mark.parametrize("spec", ["hang", "hang@0", "oom@x", "explode@1", "spawn-child@2", "oom@1/0", "nan@1/"])
def test_unknown_or_malformed_faults_are_refused(spec):
    with pytest.raises(FaultConfigError, match="not a known fault"):
        FaultPlan.from_env({"ZIMAGE_FAULT": spec, "ZIMAGE_TEST_MODE": "1"})


def test_fault_fires_only_at_its_step_and_on_its_requests():
    plan = FaultPlan("oom", 2, every=3)
    latents = torch.zeros(1, 16, 4, 4)
    for request in (1, 2, 4):
        for step in (1, 2, 3):
            assert plan.at_step(step, request, "a cat", latents) is None
    assert plan.at_step(1, 3, "a cat", latents) is None
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        plan.at_step(2, 3, "a cat", latents)


def test_nan_fault_replaces_the_latents():
    replaced = FaultPlan("nan", 1).at_step(1, 1, "a cat", torch.ones(2, 3))
    assert replaced.shape == (2, 3) and torch.isnan(replaced).all()


def test_poison_fault_raises_the_cuda_error_text():
    with pytest.raises(RuntimeError, match="illegal memory access"):
        FaultPlan("poison", 1).at_step(1, 1, "a cat", torch.ones(1))


def test_a_fault_with_a_prompt_fires_only_for_that_prompt():
    plan = FaultPlan("oom", 1, prompt="break here")
    assert plan.at_step(1, 1, "a cat", torch.ones(1)) is None
    with pytest.raises(torch.OutOfMemoryError):
        plan.at_step(1, 2, "break here", torch.ones(1))
