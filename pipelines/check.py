"""`fastemd check-data SOURCES`: check every image once, write a manifest of the good ones.

Training reads the manifest (it is a source like any other), so a bad file costs one line in a
report instead of a crash at hour 30. Rules, applied to the name and header first, then a full
decode:

rejected (in the report, left out of the manifest):
- a name that is not valid UTF-8 or holds a line break (DALI takes no such name, a manifest line
  cannot hold it): rename the file;
- a link that leads nowhere or to itself; cannot be read, zero bytes, not an image, or not JPEG/PNG;
- smaller than 32 px on a side (a 224 crop of it would be a blur of a few pixels);
- larger than 10,000 px on a side: rejected, not decoded (one such RGB image is >= 300 MB
  decoded, more than nvJPEG's preallocated buffers, and COCO has none);
- truncated or corrupt: the decoder stops before the end of the data.
accepted (the decoders convert them, both DALI's and the reference loader's; counted as notes):
- CMYK JPEG, grayscale or palette, 16-bit PNG (scaled to 8 bits), alpha (dropped),
  EXIF orientation (decoded upright).

Training applies the same name and header rules (`screen`, `header_problem`) to every file it is
given, with either loader, before anything decodes it, so that a file check-data would reject is
a reported skip in training too, never a 1.2 GB decode of a 68 kB file whose header lies.
Paths are shown (report, messages) by `shown`: as they are, or escaped where they hold bytes that
are not UTF-8 or characters that would break a line.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .sources import IMAGE_SUFFIXES, DataError, name_problem, resolve_sources, shown, unsupported_images

MIN_SIDE = 32
MAX_SIDE = 10_000
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class FileCheck:
    path: str
    reason: str | None = None  # why the file is rejected; None: usable
    note: str = ""  # usable, but converted on decode


def header_problem(image: Image.Image) -> str | None:
    """Why an opened (not yet decoded) image is rejected by its header alone, or None."""
    width, height = image.size
    # MPO: the multi-picture JPEG many cameras write; every decoder reads its first image
    if image.format not in ("JPEG", "MPO", "PNG"):
        return f"not a JPEG or PNG ({image.format})"
    if min(width, height) < MIN_SIDE:
        return f"too small: {width}x{height} (expected >= {MIN_SIDE} px a side)"
    if max(width, height) > MAX_SIDE:
        return f"too large: {width}x{height} (expected <= {MAX_SIDE} px a side)"
    return None


def _file_problem(path: str) -> str | None:
    """Why the file itself (not its content) is unusable: its name, a broken link, no bytes."""
    problem = name_problem(path)
    if problem is not None:
        return problem
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file"
    except OSError as e:
        if os.path.islink(path):
            if e.errno == errno.ELOOP:
                return "link loop (the link leads back to itself)"
            return f"broken link (to {shown(os.readlink(path))}, which does not exist)"
        return f"cannot read: {e.strerror}"
    return None


def screen(path: str) -> str | None:
    """The name and header rules alone, as training applies them before a decode: why the file
    is rejected, or None. Reads the header only (~0.1 ms a file)."""
    problem = _file_problem(path)
    if problem is not None:
        return problem
    try:
        with Image.open(path) as image:
            return header_problem(image)
    except OPEN_ERRORS as e:
        return open_failure(e)


# What PIL raises for a file it cannot open or decode, and the reason check-data gives for each.
OPEN_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_failure(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    if isinstance(error, Image.DecompressionBombError):
        return f"too large: {error}"
    if isinstance(error, OSError) and error.errno is not None:  # the file system's, not PIL's
        return f"cannot read: {error.strerror}"
    return f"truncated or corrupt: {error}"


def check_file(path: str) -> FileCheck:
    problem = _file_problem(path)
    if problem is not None:
        return FileCheck(path, problem)
    notes = []
    try:
        with Image.open(path) as image:
            width, height = image.size
            problem = header_problem(image)
            if problem is not None:
                return FileCheck(path, problem)
            mode = image.mode
            if mode == "CMYK":
                notes.append("CMYK")
            if mode in ("L", "LA", "P", "PA", "1") or mode.startswith("I"):
                notes.append("grayscale/palette")
            if mode.startswith("I;16") or mode == "I":
                notes.append("16-bit")
            if mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                notes.append("alpha")
            if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                notes.append("EXIF-rotated")
            if image.format == "JPEG":
                # 1/8-scale DCT decode: every coefficient is still read, so a truncated file
                # still fails, at a fifth of the cost.
                image.draft(mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    except OPEN_ERRORS as e:
        return FileCheck(path, open_failure(e))
    return FileCheck(path, None, ", ".join(notes))


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the pool and reports; the
    # workers leave it to the parent instead of each printing a traceback.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_files(files: list[str], workers: int, progress: bool = True) -> list[FileCheck]:
    """Every file, in order, checked by `workers` processes under a rich progress bar. On Ctrl-C
    the checks so far are in `exc.results` of the KeyboardInterrupt that is raised."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("checking"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    results = []
    # On stderr, like the summary: stdout may be a file, and the bar is switched on by stderr's tty.
    with Progress(*columns, disable=not progress, transient=False, console=Console(stderr=True)) as bar:
        task = bar.add_task("check", total=len(files))
        try:
            if workers <= 1:
                for path in files:
                    results.append(check_file(path))
                    bar.advance(task)
            else:
                pool = ProcessPoolExecutor(workers, initializer=_ignore_sigint)
                try:
                    for result in pool.map(check_file, files, chunksize=64):
                        results.append(result)
                        bar.advance(task)
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt as e:
            e.results = results
            raise
    return results


def write_outputs(results: list[FileCheck], manifest: Path, report: Path, sources: list[str]) -> None:
    good = [r.path for r in results if r.reason is None]
    manifest.parent.mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    header = f"{MANIFEST_HEADER} {len(good)} of {len(results)} images usable, from {' '.join(map(shown, sources))}\n"
    manifest.write_text(header + "".join(p + "\n" for p in good))  # good names are UTF-8, one line each
    report.write_text(_report_rows(results))


def _report_rows(results: list[FileCheck]) -> str:
    """The rejected files and why, then the usable ones that the decoders convert, and how."""
    rows = [f"{shown(r.path)}\t{r.reason}\n" for r in results if r.reason is not None]
    rows += [f"{shown(r.path)}\tusable, converted on decode: {r.note}\n" for r in results if r.reason is None and r.note]
    return "path\treason\n" + "".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", help="COCO json files, image folders or manifests")
    parser.add_argument("--manifest", default="manifest.txt", help="where to write the good files (default: %(default)s)")
    parser.add_argument("--report", default="bad_files.tsv", help="where to write the bad files and why (default: %(default)s)")
    from fastemd.options import positive_int

    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# The first bytes of what check-data writes: a file that starts otherwise is not its output.
MANIFEST_HEADER = "# fastemd check-data:"
REPORT_HEADERS = ("path\treason\n", "# interrupted:")


def _written_by_check_data(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64).decode("utf-8", "replace")
    except OSError:
        return False
    return head.startswith(MANIFEST_HEADER) or head.startswith(REPORT_HEADERS)


def _output_problem(option: str, path: Path, sources: list[str]) -> str | None:
    """Why `path` cannot take the output of `option` (checked before any image is), or None. An
    existing file is replaced only when check-data wrote it (a rerun); never a source, an image
    or anything else the user has."""
    from fastemd.paths import input_it_is, unwritable_file

    path = path.expanduser()
    if path.is_symlink() and not path.exists():
        return f"{option} {path} is a broken link; name a file to write"
    if input_it_is(path, sources):
        return f"{option} {path} is one of the sources; it would be overwritten: write it elsewhere"
    if path.is_dir():
        return f"{option} {path} is a folder; name the file to write"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return f"{option} {path} is named as an image; name a text file (.txt, .tsv) to write"
    if path.is_file() and path.stat().st_size > 0 and not _written_by_check_data(path):
        return (f"{option} {path} exists and is not a check-data output (an image, a file of yours?); it would be "
                "overwritten: write it elsewhere")
    if problem := unwritable_file(path):
        return f"{option} {path}{' ' if problem.startswith('is ') else ': '}{problem}"
    return None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from fastemd.paths import same_file

    console = Console(stderr=True, soft_wrap=True)  # errors; soft_wrap: a long path stays one line in a log
    out = Console(soft_wrap=True, highlight=False)  # the summary: stdout, beside the progress bar on stderr
    problems = [_output_problem(option, Path(value), args.sources)
                for option, value in (("--manifest", args.manifest), ("--report", args.report))]
    manifest, report = Path(args.manifest).expanduser(), Path(args.report).expanduser()
    if manifest.resolve() == report.resolve() or same_file(manifest, report):
        problems.append(f"--manifest and --report are the same file ({args.manifest})")
    if any(problems):
        console.print(f"[red]error:[/red] {escape(next(p for p in problems if p))}")
        return 2
    try:
        files = resolve_sources(args.sources)
    except DataError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        return 2
    # images of other formats in the folders: not read by anything here, so reported, never dropped silently
    others = [FileCheck(path, f"not a JPEG or PNG ({Path(path).suffix.lower()} files are not read): convert it to "
                              "JPEG or PNG") for path in unsupported_images(args.sources)]
    try:
        results = check_files(files, args.workers, progress=not args.no_progress and sys.stderr.isatty()) + others
    except KeyboardInterrupt as e:  # a partial manifest would drop the unchecked files silently: none
        done = getattr(e, "results", [])
        report = Path(args.report)
        report.write_text(f"# interrupted: {len(done)} of {len(files)} images checked\n" + _report_rows(done))
        console.print(f"interrupted after {len(done)} of {len(files)} images; the bad ones so far: "
                      f"{escape(args.report)}; no manifest written (run check-data again)")
        return 130
    write_outputs(results, Path(args.manifest), Path(args.report), args.sources)
    bad = [r for r in results if r.reason is not None]
    converted = [r for r in results if r.reason is None and r.note]
    other_formats = f" ({len(others)} of another format)" if others else ""
    out.print(
        f"{len(results) - len(bad)} usable ({len(converted)} converted on decode), {len(bad)} rejected{other_formats}; "
        f"manifest: {escape(args.manifest)}, report: {escape(args.report)}"
    )
    for title, rows, what in (("rejected", bad, lambda r: r.reason), ("converted on decode", converted, lambda r: r.note)):
        for r in rows[:10]:  # paths may hold [...]: escaped for rich
            out.print(f"  {title}: [yellow]{escape(shown(r.path))}[/yellow]: {escape(what(r))}")
        if len(rows) > 10:
            out.print(f"  ... and {len(rows) - 10} more {title} in {escape(args.report)}")
    return 0 if len(bad) < len(results) else 1
