import math

import pytest

from pipeline.requests import (
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    MAX_IMAGES_PER_CALL,
    RANDOM_SEED_LIMIT,
    SEED_LIMIT,
    SHOWN_CHARS,
    GenerationRequest,
    Limits,
    RequestError,
    batch,
    batch_seeds,
    parse_size,
    shown,
    validate,
)

LIMITS = Limits(max_h=1536, max_w=2048)


def test_defaults_are_turbo_defaults():
    valid = validate(GenerationRequest("a cat", seed=3), LIMITS)
    assert (valid.width, valid.height, valid.steps, valid.shift, valid.seed) == (1024, 1024, 8, 3.0, 3)


def test_prompt_is_stripped_and_chinese_is_fine():
    assert validate(GenerationRequest("  雪地里的猫  ", seed=1), LIMITS).prompt == "雪地里的猫"


def test_whole_floats_from_ui_number_fields_become_ints():
    valid = validate(GenerationRequest("x", width=1024.0, height=768.0, steps=8.0, seed=12.0), LIMITS)
    assert (valid.width, valid.height, valid.steps, valid.seed) == (1024, 768, 8, 12)
    assert all(isinstance(v, int) for v in (valid.width, valid.height, valid.steps, valid.seed))


@pytest.mark.parametrize("seed", [None, "random", " Random "])
def test_random_seed_is_drawn_and_fits_javascript(seed):
    drawn = {validate(GenerationRequest("x", seed=seed), LIMITS).seed for _ in range(20)}
    assert len(drawn) > 1 and all(0 <= s < RANDOM_SEED_LIMIT for s in drawn)


def test_largest_seed_is_accepted():
    assert validate(GenerationRequest("x", seed=2**64 - 1), LIMITS).seed == 2**64 - 1


@pytest.mark.parametrize(("field", "value", "message"), [
    ("prompt", "", "prompt is empty"),
    ("prompt", "   \n\t", "prompt is empty"),
    ("prompt", None, "prompt must be text"),
    ("prompt", 42, "prompt must be text"),
    ("prompt", "x" * 20_001, "limit is 20000"),
    ("prompt", "a\x00b", "control character U\\+0000"),
    ("prompt", "ring \x07 bell", "control character U\\+0007"),
    ("prompt", "escape \x1b[31m", "control character U\\+001B"),
    ("prompt", "lone \ud800 surrogate", "not valid Unicode"),
    ("width", 1000, "width must be a multiple of 16 .*try 992 or 1008"),
    ("height", 1030, "height must be a multiple of 16"),
    ("width", 0, "width must be between 64 and 2048"),
    ("width", -512, "width must be between"),
    ("width", 2064, "width must be between 64 and 2048 .*--max-w"),
    ("height", 1552, "height must be between 64 and 1536 .*--max-h"),
    ("width", "1024", "width must be a whole number"),
    ("width", 1024.5, "width must be a whole number"),
    ("width", True, "width must be a whole number"),
    ("height", math.nan, "height must be a whole number"),
    ("steps", 0, "steps must be between 1 and 50"),
    ("steps", 51, "steps must be between 1 and 50"),
    ("steps", -3, "steps must be between"),
    ("steps", 7.5, "steps must be a whole number"),
    ("steps", "eight", "steps must be a whole number"),
    ("seed", -1, "seed must be between 0 and"),
    ("seed", 2**64, "seed must be between 0 and"),
    ("seed", math.nan, "seed must be a whole number"),
    ("seed", "abc", "seed must be a whole number"),
    ("shift", 0, "shift must be between 1.0 and 10.0"),
    ("shift", -1.0, "shift must be between"),
    ("shift", 10.5, "shift must be between"),
    ("shift", math.nan, "shift must be a number"),
    ("shift", math.inf, "shift must be a number"),
    ("shift", "3", "shift must be a number"),
    ("loras", "a", "loras must be a list"),
    ("loras", {"name": "a"}, "loras must be a list"),
    ("loras", [{"name": f"a{index}"} for index in range(5)], "loras holds 5 adapters; the limit is 4"),
    ("loras", ["a"], "loras\\[0\\] must be "),
    ("loras", [{"name": "a", "weight": 1}], "loras\\[0\\] has the unknown key 'weight'"),
    ("loras", [{"name": ""}], "loras\\[0\\].name must be an adapter's name"),
    ("loras", [{"name": 7}], "loras\\[0\\].name must be an adapter's name"),
    ("loras", [{"name": "a", "scale": 2.5}], "loras\\[0\\].scale must be a number from -2 to 2"),
    ("loras", [{"name": "a", "scale": "1"}], "loras\\[0\\].scale must be a number"),
    ("loras", [{"name": "a", "scale": math.nan}], "loras\\[0\\].scale must be a number"),
    ("loras", [{"name": "a", "scale": True}], "loras\\[0\\].scale must be a number"),
    ("loras", [{"name": "a"}, {"name": "a", "scale": 0.5}], "names the adapter 'a' twice"),
])
def test_each_rule_rejects_with_a_message_naming_the_field(field, value, message):
    fields = {"prompt": "a cat", field: value}
    with pytest.raises(RequestError, match=message) as refused:
        validate(GenerationRequest(**fields), LIMITS)
    assert refused.value.field == field


def test_tabs_and_newlines_are_plain_text():
    assert validate(GenerationRequest("line one\n\tline two\r\n", seed=1), LIMITS).prompt == "line one\n\tline two"


def test_shown_cuts_an_echoed_value_to_a_few_dozen_characters():
    assert shown("steps") == "'steps'" and shown(8) == "8"
    long = shown("A" * 1_000_000)
    assert len(long) == SHOWN_CHARS and long.startswith("'AAAA") and long.endswith("…")
    assert len(shown([["A" * 100]] * 1000)) == SHOWN_CHARS
    assert shown("\ud800") == r"'\ud800'"  # escaped: a lone surrogate cannot break the JSON or the log it goes into


def test_a_batch_takes_consecutive_seeds_checked_whole_before_the_first_image():
    assert batch_seeds(5, 3) == [5, 6, 7]
    assert batch_seeds(5.0, 3) == [5, 6, 7]  # a whole float is that number, for every image, not 5 three times
    assert batch_seeds(None, 2) == [None, None] and batch_seeds("random", 1) == [None]
    assert batch_seeds(SEED_LIMIT - 2, 2) == [SEED_LIMIT - 2, SEED_LIMIT - 1]
    with pytest.raises(RequestError, match=r"seed must be at most .* when n is 2"):
        batch_seeds(SEED_LIMIT - 1, 2)  # the second image would need seed 2**64
    assert batch_seeds(1, 2.0) == [1, 2]  # n, like every whole number here, may come as a whole float
    for n in (0, MAX_IMAGES_PER_CALL + 1, True, 2.5, "2", float("nan")):
        with pytest.raises(RequestError, match="n must be a whole number"):
            batch_seeds(1, n)
    with pytest.raises(RequestError, match="seed must be a whole number"):
        batch_seeds(5.5, 2)


@pytest.mark.parametrize(("label", "size"), [("1152x896 ( 9:7 )", (1152, 896)), ("640×480", (640, 480)),
                                             (" 512x512", (512, 512))])
def test_labels_and_plain_sizes_parse(label, size):
    assert parse_size(label) == size


@pytest.mark.parametrize("label", ["", "big", "1024", None, 1024, "x768", "256x256 trailing junk", "256x256x3",
                                   "1152x896 ( 9:7 ) more", "9" * 40 + "x9"])
def test_unreadable_resolution_is_a_clear_error(label):
    with pytest.raises(RequestError, match="resolution must look like 1024x1024"):
        parse_size(label, "resolution")


def test_a_batch_reads_size_n_and_seeds_before_any_image():
    first, second = batch("a cat", "1152x896", 2, 7)
    assert (first.width, first.height, first.seed, second.seed) == (1152, 896, 7, 8)
    assert (first.steps, first.shift) == (DEFAULT_STEPS, DEFAULT_SHIFT)
    assert [request.seed for request in batch("a cat", "64x64", 3, "random", steps=2, shift=5.0)] == [None] * 3
    with pytest.raises(RequestError, match="n must be a whole number from 1 to 4"):
        batch("a cat", "not a size", 9, 7)  # n first, as the OpenAI route reports it
    with pytest.raises(RequestError, match="size must look like 1024x1024"):
        batch("a cat", "1024", 1, 7)


def test_a_huge_number_is_echoed_cut_and_other_scripts_digits_are_not_sizes():
    for field in ("seed", "steps", "width"):
        with pytest.raises(RequestError) as refused:
            validate(GenerationRequest(prompt="x", **{field: 10**4000}), LIMITS)
        assert len(str(refused.value)) < 200 and "…" in str(refused.value)
    with pytest.raises(RequestError, match="size must look like 1024x1024"):
        parse_size("١٠٢٤x64")


def test_a1111_lora_tags_leave_the_prompt_and_join_the_listed_adapters():
    valid = validate(GenerationRequest("<lora:ink:0.6>a fox <LORA:film grain> in snow <lora:neg:-1.5>",
                                       loras=[{"name": "style", "scale": 0.8}], seed=1), LIMITS)
    assert valid.prompt == "a fox in snow"
    assert [(choice.name, choice.scale) for choice in valid.loras] == [("style", 0.8), ("ink", 0.6),
                                                                       ("film grain", 1.0), ("neg", -1.5)]


@pytest.mark.parametrize(("prompt", "loras", "message", "field"), [
    ("a fox <lora:ink:strong>", None, "the strength in the prompt's '<lora:ink:strong>' must be a number", "loras"),
    ("a fox <lora:ink:3>", None, "must be a number from -2 to 2", "loras"),
    ("a fox <lora::1>", None, "the name in the prompt's '<lora::1>' must be an adapter's name", "loras"),
    ("a fox <lora:ink:1>", [{"name": "ink"}], "names the adapter 'ink' twice", "loras"),
    ("<lora:a><lora:b><lora:c>", [{"name": "d"}, {"name": "e"}], "asks for 5 adapters .* the limit is 4", "loras"),
    ("  <lora:ink:0.5>  ", None, "prompt is empty once its <lora:…> tags are taken out", "prompt"),
])
def test_a_bad_lora_tag_is_refused_naming_it(prompt, loras, message, field):
    with pytest.raises(RequestError, match=message) as refused:
        validate(GenerationRequest(prompt, loras=loras), LIMITS)
    assert refused.value.field == field
