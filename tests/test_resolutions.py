from pipeline.requests import parse_size
from webui.resolutions import RESOLUTIONS, left_out, offered, offered_sizes

RATIOS = ["1:1", "9:7", "7:9", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21"]


def test_three_categories_of_the_eleven_official_ratios_in_multiples_of_16():
    assert list(RESOLUTIONS) == ["1024", "1280", "1536"]
    for labels in RESOLUTIONS.values():
        assert [label.split("(")[1].strip(" )") for label in labels] == RATIOS
        for label in labels:
            width, height = parse_size(label)
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


def test_sizes_the_memory_guard_refuses_are_left_out_and_named():
    def fits(width, height):  # a card with room for 1.5 megapixels
        return width * height <= 1_500_000

    table = offered(max_w=2048, max_h=2048, fits=fits)
    assert len(table["1024"]) == 11 and "1280x1280 ( 1:1 )" not in table["1280"]
    assert "1536" not in table  # every size of that category is over 1.5 megapixels
    missing = left_out(max_w=2048, max_h=2048, fits=fits)
    assert "1280x1280" in missing and "2048x1152" in missing and "1024x1024" not in missing
    offered_sizes = {label.split(" (")[0] for labels in table.values() for label in labels}
    assert len(offered_sizes) + len(missing) == 33 and not offered_sizes & set(missing)


def test_the_offered_sizes_are_the_tables_labels_as_numbers_the_default_first():
    sizes = offered_sizes(1536, 1536)
    assert sizes[0] == (1024, 1024)
    assert len(sizes) == sum(len(labels) for labels in offered(1536, 1536).values())
    assert all(width <= 1536 and height <= 1536 for width, height in sizes) and (1536, 1536) in sizes
