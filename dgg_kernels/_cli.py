"""Flag checks shared by every command line: the demo (python -m dgg_kernels.demo) and the benchmark scripts.

Each command line checks all of its flags before it does any work, so a bad value costs a second, not
a run: argparse exits with status 2 and a message naming the flag and what it takes.  Abbreviated
flags are refused (``allow_abbrev=False``): with presets (--quick, --config) a flag the user thought
they gave could otherwise lose silently to the preset.  An output folder is created and test-written
first (``writable_dir``), so a run never ends with nowhere to write.

The benchmarks reach these through benchmarks/common.py; they live in the package because the
demo, which is installed without the benchmarks, uses them too.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence


def parser(doc: str, formatter_class=argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    """An ArgumentParser that refuses abbreviated flags; description: ``doc``'s first line, epilog: the rest."""
    head, _, rest = doc.partition("\n")
    return argparse.ArgumentParser(description=head, epilog=rest.strip("\n") or None,
                                   formatter_class=formatter_class, allow_abbrev=False)


def _bounds(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts)


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an int in [lo, hi] (None: unbounded on that side)."""
    what = "an int" + (" " + _bounds(lo, hi) if lo is not None or hi is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           inf: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a float within the bounds (``lo_open``/``hi_open``: strict); never NaN, and
    infinite only with ``inf=True``."""
    bounds = _bounds(lo, hi, lo_open, hi_open)
    what = ("a number" if inf else "a finite number") + (" " + bounds if bounds else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        bad = (
            math.isnan(value)
            or (not inf and math.isinf(value))
            or (lo is not None and (value <= lo if lo_open else value < lo))
            or (hi is not None and (value >= hi if hi_open else value > hi))
        )
        if bad:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


def fraction(*, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A number in [0, 1] (either end open on request)."""
    return number(0.0, 1.0, lo_open=lo_open, hi_open=hi_open)


def names(known: Sequence[str], what: str, allow_empty: bool = True) -> Callable[[str], list[str]]:
    """An argparse ``type``: comma-separated names, each one of ``known`` (an empty string: an empty list, when
    ``allow_empty``; the script's "all" or its default)."""
    known = list(known)

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items and not allow_empty:
            raise argparse.ArgumentTypeError(f"give at least one {what}, of: {', '.join(known)}")
        unknown = [x for x in items if x not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(repr(x) for x in unknown)}; known: {', '.join(known)}"
            )
        if len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"a {what} is listed twice in {text!r}")
        return items

    parse.__name__ = what
    return parse


def int_list(lo: int = 1, power_of_two: bool = False) -> Callable[[str], list[int]]:
    """An argparse ``type``: comma-separated ints, each >= lo (and a power of two if asked), at least one."""
    what = f"comma-separated ints >= {lo}" + (", each a power of two" if power_of_two else "")

    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not values or any(v < lo or (power_of_two and v & (v - 1)) for v in values):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return values

    parse.__name__ = "ints"
    return parse


def writable_dir(ap: argparse.ArgumentParser, path, flag: str = "--out") -> Path:
    """Create folder ``path`` (and its parents) and write a file into it; ``ap.error`` (exit 2) if either fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        ap.error(f"{flag} {path}: cannot write there ({e.strerror or e}); pick a folder you can write to")
    return path


def writable_file(ap: argparse.ArgumentParser, path, flag: str = "--out") -> Path:
    """A file path whose folder exists and is writable (and the file, if it exists); ``ap.error`` if not."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        ap.error(f"{flag} {path}: is a folder; give a file path")
    if not folder.is_dir():
        ap.error(f"{flag} {path}: {folder} {'is not a folder' if folder.exists() else 'does not exist'}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        ap.error(f"{flag} {path}: cannot write there (permission denied)")
    return path


def readable_file(ap: argparse.ArgumentParser, path, flag: str) -> Path:
    """An existing, readable file; ``ap.error`` if not."""
    path = Path(path)
    if not path.is_file():
        ap.error(f"{flag} {path}: no such file")
    if not os.access(path, os.R_OK):
        ap.error(f"{flag} {path}: cannot read it (permission denied)")
    return path


def device(ap: argparse.ArgumentParser, text: str, flag: str = "--device", auto: bool = False, source: str = ""):
    """The torch.device ``text`` names ("auto" too when ``auto``: cuda if available, else cpu); ``ap.error``
    for a malformed name, a device type other than cpu/cuda, or cuda without a CUDA device.  ``source``: where
    the value came from when not from the command line (e.g. "from --config gpu"), for the message."""
    import torch

    flag = f"{flag} {text!r}" + (f" ({source})" if source else "")
    if auto and text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        ap.error(f"{flag}: use {'auto, ' if auto else ''}cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            ap.error(f"{flag}: torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            ap.error(f"{flag}: there are {torch.cuda.device_count()} CUDA devices")
    return dev
