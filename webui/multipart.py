"""multipart/form-data bodies read in memory, for the route that takes uploads (/v1/images/edits).

On python-multipart's parser, the one Starlette's `request.form()` uses, but not through that method: it spools
any file part over 1 MB to a temporary file on disk, and an uploaded picture must never be written to a shared
temporary folder. The body is whole in memory already (its size bounded by webui.limits.LimitBodySize), so each
part is a view of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_PARTS = 32  # OpenAI's edit takes about a dozen fields; a body of thousands of tiny parts is only parser work
MAX_FIELD_BYTES = 256 * 1024  # a text field: a prompt of 20,000 characters escaped fits many times over


class FormError(ValueError):
    """A body that is not a readable form; the message says what is wrong with it."""


@dataclass
class Part:
    name: str
    filename: str | None  # None for a text field
    # Views into the body, not copies: an upload of 20 MB read into a new buffer or two per request kept the
    # service's resident memory hundreds of MB higher under a stream of them.
    pieces: list[memoryview] = field(default_factory=list)

    @property
    def data(self) -> memoryview | bytes:
        return self.pieces[0] if len(self.pieces) == 1 else b"".join(self.pieces)

    def text(self) -> str:
        if sum(len(piece) for piece in self.pieces) > MAX_FIELD_BYTES:
            raise FormError(f"The field {self.name!r} is over {MAX_FIELD_BYTES // 1024} KB; send a shorter value.")
        try:
            return bytes(self.data).decode("utf-8")
        except UnicodeDecodeError:
            raise FormError(f"The field {self.name!r} is not UTF-8 text.") from None


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a multipart/form-data Content-Type; None for any other type."""
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        return None
    return options.get(b"boundary") or None


def read_form(body: bytes, boundary: bytes) -> list[Part]:
    """The body's parts in order; FormError for a body that is not a whole form of at most MAX_PARTS parts."""
    parts: list[Part] = []
    header: dict[str, bytes] = {}
    name = value = b""
    ended = False

    def on_part_begin() -> None:
        header.clear()
        if len(parts) == MAX_PARTS:
            raise FormError(f"The form has more than {MAX_PARTS} parts.")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        nonlocal name
        name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        nonlocal value
        value += data[start:end]

    def on_header_end() -> None:
        nonlocal name, value
        header[name.decode("latin-1").lower()] = value
        name = value = b""

    def on_headers_finished() -> None:
        disposition, options = parse_options_header(header.get("content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise FormError("Each part of the form needs Content-Disposition: form-data with a name.")
        filename = options.get(b"filename")
        parts.append(Part(name=options[b"name"].decode("utf-8", "replace"),
                          filename=None if filename is None else filename.decode("utf-8", "replace")))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].pieces.append(memoryview(data)[start:end])

    def on_end() -> None:
        nonlocal ended
        ended = True

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_end": on_end})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError:
        raise FormError("The body is not a valid multipart/form-data form.") from None
    if not ended:
        raise FormError("The form ends before its closing boundary: the body was cut off.")
    return parts
