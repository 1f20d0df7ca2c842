"""`fastemd check-data`: the bad-file zoo, the manifest, and what the loaders make of it."""

import argparse
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastemd.pipelines import build_two_view_loader, resolve_sources
from fastemd.pipelines import check
from fastemd.pipelines.torch_loader import decode_rgb


def _rgb(height=48, width=64, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _jpeg_bytes(image):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _zoo(folder):
    """file name -> expected reason fragment (None: accepted)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    def add(name, reason, write):
        write(folder / name)
        expected[name] = reason

    add("good.jpg", None, lambda p: _rgb().save(p))
    add("zero.jpg", "zero-byte", lambda p: p.write_bytes(b""))
    add("truncated.jpg", "truncated", lambda p: p.write_bytes(_jpeg_bytes(_rgb(200, 200))[:2000]))
    add("truncated.png", "truncated", lambda p: (_rgb().save(p), p.write_bytes(p.read_bytes()[:900])))
    add("text.jpg", "not an image", lambda p: p.write_text("hello, I am not a picture\n" * 20))
    add("gif_named.png", "not a JPEG or PNG", lambda p: _rgb().save(p, format="GIF"))
    add("tiny.png", "too small", lambda p: _rgb(20, 40).save(p))
    add("huge.png", "too large", lambda p: Image.new("RGB", (10_001, 40)).save(p))
    add("cmyk.jpg", None, lambda p: _rgb().convert("CMYK").save(p))
    add("gray.jpg", None, lambda p: _rgb().convert("L").save(p))
    add("gray16.png", None, lambda p: Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(p))
    add("alpha.png", None, lambda p: _rgb().convert("RGBA").save(p))

    def exif_rotated(p):
        exif = Image.Exif()
        exif[0x0112] = 6  # stored 64 wide, 48 tall; shown rotated 90 degrees: 48 wide, 64 tall
        _rgb().save(p, exif=exif)

    add("exif.jpg", None, exif_rotated)
    return expected


def test_zoo_is_classified(tmp_path):
    expected = _zoo(tmp_path)
    for name, reason in expected.items():
        result = check.check_file(str(tmp_path / name))
        if reason is None:
            assert result.reason is None, (name, result.reason)
        else:
            assert result.reason is not None and reason in result.reason, (name, result.reason)
    notes = {name: check.check_file(str(tmp_path / name)).note for name in expected}
    assert "CMYK" in notes["cmyk.jpg"] and "16-bit" in notes["gray16.png"]
    assert "alpha" in notes["alpha.png"] and "EXIF" in notes["exif.jpg"] and "grayscale" in notes["gray.jpg"]
    assert check.check_file(str(tmp_path / "missing.jpg")).reason.startswith("cannot read")


def test_check_data_writes_manifest_and_report(tmp_path):
    expected = _zoo(tmp_path / "zoo")
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    manifest, report = tmp_path / "out" / "manifest.txt", tmp_path / "out" / "bad.tsv"
    args = parser.parse_args([str(tmp_path / "zoo"), "--manifest", str(manifest), "--report", str(report), "--workers", "2"])
    assert check.run(args) == 0
    good = sorted(str((tmp_path / "zoo" / n).resolve()) for n, r in expected.items() if r is None)
    assert resolve_sources([str(manifest)]) == good  # training reads the manifest as a source
    rows = [line.split("\t") for line in report.read_text().splitlines()[1:]]
    bad = [(path, reason) for path, reason in rows if not reason.startswith("usable, converted on decode: ")]
    assert sorted(path.rsplit("/", 1)[1] for path, _ in bad) == sorted(n for n, r in expected.items() if r)
    for path, reason in bad:
        assert expected[path.rsplit("/", 1)[1]] in reason
    converted = {path.rsplit("/", 1)[1]: reason for path, reason in rows if (path, reason) not in bad}
    assert {"cmyk.jpg", "gray16.png", "alpha.png", "exif.jpg"} <= set(converted)  # named, with how
    assert all(expected[name] is None for name in converted) and "CMYK" in converted["cmyk.jpg"]


def test_check_data_names_images_of_other_formats_and_the_converted_ones_on_stdout(tmp_path):
    """A folder's .gif, .tif, .bmp and .webp files were neither counted nor reported: they are
    rejected by name now, with what to do; the converted files are named; the summary goes to
    stdout (errors and the progress bar to stderr)."""
    import subprocess
    import sys

    folder = tmp_path / "mixed"
    folder.mkdir()
    _rgb().save(folder / "good.jpg")
    _rgb().convert("CMYK").save(folder / "cmyk.jpg")
    for name, fmt in (("anim.gif", "GIF"), ("scan.tif", "TIFF"), ("old.bmp", "BMP"), ("web.webp", "WEBP"),
                      ("deep/scan2.TIFF", "TIFF")):
        (folder / name).parent.mkdir(exist_ok=True)
        _rgb().save(folder / name, format=fmt)
    (folder / "notes.txt").write_text("not an image, not listed")
    report = tmp_path / "bad.tsv"
    proc = subprocess.run([sys.executable, "-m", "fastemd.cli", "check-data", str(folder), "--manifest",
                           str(tmp_path / "m.txt"), "--report", str(report), "--workers", "1", "--no-progress"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("2 usable (1 converted on decode), 5 rejected (5 of another format); manifest: ")
    for name in ("anim.gif", "scan.tif", "old.bmp", "web.webp", "deep/scan2.TIFF"):
        assert f"rejected: {folder / name}: not a JPEG or PNG" in proc.stdout, proc.stdout
    assert f"converted on decode: {folder / 'cmyk.jpg'}: " in proc.stdout
    rows = dict(line.split("\t") for line in report.read_text().splitlines()[1:])
    assert "convert it to JPEG or PNG" in rows[str(folder / "anim.gif")] and "notes.txt" not in report.read_text()
    assert resolve_sources([str(tmp_path / "m.txt")]) == sorted(str(folder / n) for n in ("cmyk.jpg", "good.jpg"))


def test_manifest_round_trips_file_names_with_hash_and_spaces(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    names = ["img#1.jpg", " lead.jpg", "a b.jpg"]
    for name in names:
        Image.new("RGB", (64, 48), (90, 120, 30)).save(folder / name)
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    manifest = tmp_path / "manifest.txt"
    assert check.run(parser.parse_args([str(folder), "--manifest", str(manifest), "--report",
                                        str(tmp_path / "bad.tsv"), "--workers", "1"])) == 0
    assert resolve_sources([str(manifest)]) == sorted(str((folder / n).resolve()) for n in names)


def test_camera_mpo_jpegs_are_accepted_and_bracketed_paths_printed_as_is(tmp_path, capsys):
    folder = tmp_path / "cam"
    folder.mkdir()
    first, second = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (64, 48), (30, 30, 200))
    first.save(folder / "photo.jpg", format="MPO", save_all=True, append_images=[second])
    with Image.open(folder / "photo.jpg") as image:
        assert image.format == "MPO"
    assert check.check_file(str(folder / "photo.jpg")).reason is None
    (folder / "z[").mkdir()
    (folder / "z[" / "b].jpg").write_bytes(b"")  # ".../z[/b].jpg" reads as rich markup
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    assert check.run(parser.parse_args([str(folder), "--manifest", str(tmp_path / "m.txt"), "--report",
                                        str(tmp_path / "bad.tsv"), "--workers", "1"])) == 0
    assert "z[/b].jpg: zero-byte file" in capsys.readouterr().out


def test_check_data_names_a_missing_source(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    assert check.run(parser.parse_args([str(tmp_path / "nowhere"), "--manifest", str(tmp_path / "m.txt")])) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_loaders_decode_every_accepted_file(tmp_path, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    expected = _zoo(tmp_path)
    good = [str(tmp_path / n) for n, r in expected.items() if r is None]
    loader = build_two_view_loader(good, kind=kind, batch_size=len(good), view_sizes=(32, 32), workers=1, on_bad_file="stop")
    (v1, v2), = list(loader.epoch(0))
    assert torch.isfinite(v1).all() and v1.shape == (len(good), 3, 32, 32)


def test_exif_and_16_bit_are_decoded_like_dali(tmp_path):
    _zoo(tmp_path)
    assert decode_rgb(str(tmp_path / "exif.jpg")).size == (48, 64)  # upright: 48 wide, 64 tall
    gray16 = np.asarray(decode_rgb(str(tmp_path / "gray16.png")))
    assert gray16.shape == (48, 64, 3) and abs(int(gray16[0, 0, 0]) - 40000 // 256) <= 1  # scaled, not clipped
    dali = pytest.importorskip("nvidia.dali")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    @dali.pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def decode():
        encoded, _ = fn.readers.file(files=[str(tmp_path / "exif.jpg"), str(tmp_path / "gray16.png")])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (images,) = pipe.run()
    assert images.at(0).shape == (64, 48, 3)
    assert abs(int(images.at(1)[0, 0, 0]) - int(gray16[0, 0, 0])) <= 1
