"""fastemd.paths: the one answer every command gives to "can this path be written?"."""

import os
from pathlib import Path

from fastemd.paths import input_it_is, unwritable_file, unwritable_folder


def test_a_folder_to_make_and_fill(tmp_path):
    (tmp_path / "file").write_text("x")
    assert unwritable_folder(tmp_path / "new" / "deeper") is None  # made on the way
    assert unwritable_folder(tmp_path) is None
    assert unwritable_folder(tmp_path / "file") == "is a file, not a folder"
    assert unwritable_folder(tmp_path / "file" / "sub") == f"{tmp_path / 'file'} is a file, not a folder"


def test_a_file_to_write(tmp_path):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    assert unwritable_file(tmp_path / "a" / "b" / "out.txt") is None
    assert unwritable_file(tmp_path / "file") is None  # whether to replace it is the command's rule
    assert unwritable_file(tmp_path / "dangling") == "is a broken link; name a file to write"
    assert unwritable_file(tmp_path) == "is a folder; name the file to write"
    assert unwritable_file(tmp_path / "file" / "out.txt") == f"{tmp_path / 'file'} is a file, not a folder"
    assert unwritable_file(tmp_path / "a" / "out.json", make_parents=False) == f"folder {tmp_path / 'a'} does not exist"


def test_never_over_an_input_links_followed(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    os.link(ann, tmp_path / "hard.json")
    os.symlink(ann, tmp_path / "soft.json")
    inputs = ["other.json", f"{ann}::{tmp_path / 'images'}"]  # ANN.json::IMAGE_DIR reads ANN.json
    for path in (ann, tmp_path / "hard.json", tmp_path / "soft.json", tmp_path / "." / "ann.json"):
        assert input_it_is(Path(path), inputs) == str(ann), path
    assert input_it_is(tmp_path / "new.json", inputs) is None


def test_check_data_outputs_say_the_first_problem_in_order(tmp_path):
    """check-data's --manifest/--report: a broken link is named as one before its name is read, a
    source folder as a source before it is a folder."""
    from fastemd.pipelines.check import _output_problem

    images = tmp_path / "imgs"
    images.mkdir()
    os.symlink(tmp_path / "missing.jpg", tmp_path / "x.jpg")
    assert _output_problem("--manifest", tmp_path / "x.jpg", [str(images)]).endswith("is a broken link; name a file to write")
    assert "is one of the sources" in _output_problem("--manifest", images, [str(images)])
    assert _output_problem("--manifest", tmp_path, [str(images)]).endswith("is a folder; name the file to write")


def test_probe_output_that_exists_and_is_not_a_file_needs_force(tmp_path):
    """eval probe --output on a FIFO (anything that exists and is not a folder) needs --force."""
    from fastemd.eval.probe import _check_output

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert _check_output(str(fifo)) == f"--output {fifo}: exists; pass --force to replace it"
    assert _check_output(str(fifo), force=True) is None
