import pytest

from pipeline.requests import RequestError
from webui.resolutions import RESOLUTIONS, offered, parse_resolution

RATIOS = ["1:1", "9:7", "7:9", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21"]


def test_three_categories_of_the_eleven_official_ratios_in_multiples_of_16():
    assert list(RESOLUTIONS) == ["1024", "1280", "1536"]
    for labels in RESOLUTIONS.values():
        assert [label.split("(")[1].strip(" )") for label in labels] == RATIOS
        for label in labels:
            width, height = parse_resolution(label)
            assert width % 16 == 0 and height % 16 == 0
            a, b = map(int, label.split("(")[1].strip(" )").split(":"))
            assert abs(width / height - a / b) < 0.08


def test_sizes_over_the_limits_are_not_offered():
    table = offered(max_w=1536, max_h=1536)
    assert "1536x1536 ( 1:1 )" in table["1536"]
    assert "2048x1152 ( 16:9 )" not in table["1536"] and "1152x2048 ( 9:16 )" not in table["1536"]
    assert len(table["1024"]) == 11
    small = offered(max_w=1024, max_h=1024)
    assert list(small) == ["1024"] and small["1024"] == ["1024x1024 ( 1:1 )"]


@pytest.mark.parametrize(("label", "size"), [("1152x896 ( 9:7 )", (1152, 896)), ("640×480", (640, 480)),
                                             (" 512x512", (512, 512))])
def test_labels_and_plain_sizes_parse(label, size):
    assert parse_resolution(label) == size


@pytest.mark.parametrize("label", ["", "big", "1024", None, 1024, "x768"])
def test_unreadable_resolution_is_a_clear_error(label):
    with pytest.raises(RequestError, match="resolution must look like 1024x1024"):
        parse_resolution(label)
