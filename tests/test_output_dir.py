import logging
import os
import shutil

import pytest

from pipeline.output_dir import OutputDirCheck, OutputDirError, find_problem, prepare_output_dir


def test_a_missing_output_dir_is_created_and_left_clean(tmp_path):
    output_dir = tmp_path / "a" / "b" / "outputs"
    prepare_output_dir(output_dir)
    assert output_dir.is_dir() and list(output_dir.iterdir()) == []  # the test file is gone again


# Root writes through permission bits, so the directories that cannot be written here are ones that cannot exist.
def test_a_file_where_the_directory_should_be_is_refused(tmp_path):
    blocker = tmp_path / "outputs"
    blocker.write_text("not a directory")
    with pytest.raises(OutputDirError, match=f"output_dir {blocker} exists but is not a directory"):
        prepare_output_dir(blocker)
    assert find_problem(blocker) == f"output_dir {blocker} is not a directory"


def test_a_directory_that_cannot_be_created_is_refused_naming_why(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match=f"output_dir {blocker / 'outputs'} is not a writable directory: "
                                             "Not a directory"):
        prepare_output_dir(blocker / "outputs")
    assert find_problem(blocker / "outputs") == f"output_dir {blocker / 'outputs'} (missing; its parent {blocker}) " \
                                                "is not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-500 directory")
def test_a_read_only_directory_is_refused(tmp_path):
    output_dir = tmp_path / "outputs"
    output_dir.mkdir(mode=0o500)
    with pytest.raises(OutputDirError, match="is not a writable directory: Permission denied"):
        prepare_output_dir(output_dir)
    assert find_problem(output_dir) == f"output_dir {output_dir} is not writable"


def test_too_little_free_space_is_a_problem_at_start_and_later(tmp_path):
    needed = shutil.disk_usage(tmp_path).free + 2**40
    with pytest.raises(OutputDirError, match=f"has less than {needed // 2**20} MiB free"):
        prepare_output_dir(tmp_path, min_free_bytes=needed)
    assert find_problem(tmp_path, min_free_bytes=needed).endswith(f"has less than {needed // 2**20} MiB free")
    assert find_problem(tmp_path) is None


def test_a_missing_directory_under_a_writable_parent_is_no_problem(tmp_path):
    assert find_problem(tmp_path / "not" / "yet") is None  # saving the first image creates it


def test_the_check_logs_once_when_the_directory_breaks_and_once_when_it_is_fixed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="zimage.output_dir")
    output_dir = tmp_path / "outputs"
    check = OutputDirCheck(output_dir)
    assert check.problem() is None
    output_dir.write_text("")
    for _ in range(3):
        assert check.problem() == f"output_dir {output_dir} is not a directory"
    output_dir.unlink()
    output_dir.mkdir()
    assert check.problem() is None and check.problem() is None
    assert [record.getMessage().split(":")[0] for record in caplog.records] == ["output dir unusable",
                                                                                "output dir usable again"]
