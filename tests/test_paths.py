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
