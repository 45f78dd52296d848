from pipeline.messages import first_line


def test_the_first_line_of_a_message_or_the_type_when_there_is_none():
    assert first_line(RuntimeError("CUDA error: an illegal memory access\nmore\nlines")) == \
        "CUDA error: an illegal memory access"
    assert first_line(RuntimeError("  \n  leading blank lines\nnext")) == "leading blank lines"
    assert first_line(OSError()) == "OSError"
    assert first_line(ValueError("   ")) == "ValueError"
