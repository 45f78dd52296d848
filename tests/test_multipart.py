import pytest

from tests.helpers import multipart_body
from webui.multipart import MAX_FIELD_BYTES, MAX_PARTS, FormError, boundary_of, read_form


def test_fields_and_files_come_back_in_order_byte_for_byte():
    picture = bytes(range(256)) * 4 + b"\r\n--zimage-test-boundary-not-quite"
    body, content_type = multipart_body({"prompt": "ein Haus am See", "n": "2"}, [("image", "a.png", picture)])
    parts = read_form(body, boundary_of(content_type))
    assert [(part.name, part.filename) for part in parts] == [("prompt", None), ("n", None), ("image", "a.png")]
    assert parts[0].text() == "ein Haus am See" and bytes(parts[2].data) == picture


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data", "text/plain; boundary=x",
                                          "multipart/mixed; boundary=x", ""])
def test_only_a_form_with_a_boundary_is_a_form(content_type):
    assert boundary_of(content_type) is None


def test_a_cut_off_body_is_refused():
    body, content_type = multipart_body({"prompt": "x"}, [("image", "a.png", b"\x89PNG" * 100)])
    with pytest.raises(FormError, match="cut off"):
        read_form(body[:-40], boundary_of(content_type))


def test_a_body_that_is_no_form_is_refused():
    with pytest.raises(FormError):
        read_form(b"this is not multipart at all", b"zimage-test-boundary")


def test_a_part_without_a_name_is_refused():
    body = (b"--b\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--b--\r\n")
    with pytest.raises(FormError, match="with a name"):
        read_form(body, b"b")


def test_too_many_parts_are_refused_before_they_are_kept():
    body, content_type = multipart_body({f"field{number}": "x" for number in range(MAX_PARTS + 1)}, [])
    with pytest.raises(FormError, match=f"more than {MAX_PARTS}"):
        read_form(body, boundary_of(content_type))


def test_a_text_field_is_utf8_of_bounded_length():
    body, content_type = multipart_body({}, [("prompt", "p", b"\xff\xfe"), ("seed", "s", b"1" * (MAX_FIELD_BYTES + 1))])
    prompt, seed = read_form(body, boundary_of(content_type))
    with pytest.raises(FormError, match="not UTF-8"):
        prompt.text()
    with pytest.raises(FormError, match="KB"):
        seed.text()
