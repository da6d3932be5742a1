"""Hostile training data: image paths kept inside the TSV's folder, nothing but regular files read (never a device or
a FIFO, never more than a cap), every image mode to the right RGB, a pixel cap and a format allow-list, a directory
given as --data, a UTF-8 BOM. Each case names the file and line of the refused row."""
import base64
import io
import os
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenpaint.data import BadRowError, TSVImageText, iter_rows, read_prompts
from tokenpaint.data.images import ImageLimits
from tokenpaint.data.tsv import iter_lines, load_image_field

ROOT = Path(__file__).resolve().parents[2]


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def layout(tmp_path):
    """data/train.tsv beside data/in.png; outside.png one folder up; a symlink from inside to outside."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(data / "in.png")
    Image.new("RGB", (4, 4), (200, 0, 0)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", data / "link_out.png")
    os.symlink(data / "in.png", data / "link_in.png")
    return data


def read_one(data_dir: Path, field: str, limits=ImageLimits()):
    tsv = data_dir / "train.tsv"
    tsv.write_text(f"0\ta caption\t{field}\n", encoding="utf-8")
    return list(TSVImageText(str(tsv), resolution=4, limits=limits))


@pytest.mark.parametrize("field", ["../outside.png", "ABSOLUTE", "link_out.png"])
def test_image_paths_outside_the_tsv_folder_are_refused_unless_allowed(layout, field):
    field = str(layout.parent / "outside.png") if field == "ABSOLUTE" else field
    with pytest.raises(BadRowError, match=r"train\.tsv:1: image path .* outside the TSV's folder") as e:
        read_one(layout, field)
    assert e.value.kind == "path" and "--allow-outside-paths" in str(e.value)
    rows = read_one(layout, field, ImageLimits(allow_outside_paths=True))
    assert rows[0]["image"][0, 0, 0].item() > 0.5  # the red outside image


@pytest.mark.parametrize("field", ["in.png", "link_in.png", "./sub/../in.png"])
def test_paths_that_stay_inside_are_read(layout, field):
    (layout / "sub").mkdir(exist_ok=True)
    assert len(read_one(layout, field)) == 1


@pytest.fixture
def alarm():
    """A read that blocks (a FIFO opened for reading) fails the test instead of hanging the suite."""
    def on_alarm(*_):
        raise TimeoutError("the read blocked")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_devices_fifos_and_directories_are_never_read(layout, kind, alarm):
    if kind == "fifo":
        os.mkfifo(layout / "pipe")  # no writer: a blocking open would hang forever
        field, limits = "pipe", ImageLimits()
    elif kind == "dev_zero":  # would be read until memory runs out
        field, limits = "/dev/zero", ImageLimits(allow_outside_paths=True)
    else:
        (layout / "folder.png").mkdir()
        field, limits = "folder.png", ImageLimits()
    with pytest.raises(BadRowError, match=r"train\.tsv:1: cannot read image path .*not a regular file") as e:
        read_one(layout, field, limits)
    assert e.value.kind == "path"


def test_image_files_and_base64_fields_over_the_size_cap_are_refused(layout):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (layout / "big.png").write_bytes(png(noise))
    limits = ImageLimits(max_file_bytes=1000)
    with pytest.raises(BadRowError, match=r"train\.tsv:1: .*over the cap of 1000 bytes"):
        read_one(layout, "big.png", limits)
    with pytest.raises(BadRowError, match=r"train\.tsv:1: base64 image over the cap of 1000 bytes"):
        read_one(layout, b64(png(noise)), limits)
    assert len(read_one(layout, "big.png")) == 1  # the default cap is far above


def test_a_line_over_the_cap_is_an_error_without_reading_the_rest(tmp_path):
    path = tmp_path / "long.tsv"
    path.write_bytes(b"0\tok\tx\n" + b"a" * 5000 + b"\n")
    with pytest.raises(BadRowError, match=r"long\.tsv:2: line longer than 100 bytes"):
        list(iter_lines(path, max_line_bytes=100))


def _grey16_png(value: int) -> bytes:
    img = Image.fromarray(np.full((4, 4), value, dtype=np.uint16))  # mode I;16
    return png(img)


@pytest.mark.parametrize("name, make, expected", [
    ("16-bit grey PNG", lambda: _grey16_png(32768), (128, 128, 128)),
    ("16-bit grey PNG, dark", lambda: _grey16_png(2570), (10, 10, 10)),
    ("32-bit int TIFF", lambda: _save(Image.fromarray(np.full((4, 4), 65535, np.int32), "I"), "TIFF"), (255,) * 3),
    ("float TIFF", lambda: _save(Image.fromarray(np.full((4, 4), 0.5, np.float32), "F"), "TIFF"), (128,) * 3),
    ("CMYK JPEG", lambda: _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), (255, 0, 0)),
    ("grey + alpha", lambda: png(Image.new("LA", (4, 4), (0, 0))), (255, 255, 255)),  # transparent -> white
    ("1-bit", lambda: png(Image.new("1", (4, 4), 1)), (255, 255, 255)),
    ("palette", lambda: png(Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")), (0, 0, 255)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_image_mode_converts_to_the_right_rgb(tmp_path, name, make, expected):
    img = load_image_field(b64(make()), tmp_path / "d.tsv", 1)
    assert img.mode == "RGB"
    got = img.getpixel((1, 1))
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 2, (name, got)


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims width x height: opening reads the header only."""
    data = bytearray(png(Image.new("L", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"


@pytest.mark.parametrize("name, data, message", [
    ("100 Mpx header", _png_claiming_size(10000, 10000),
     r"10000x10000 pixels \(100\.0 Mpx\) is over the cap of 40 Mpx"),
    ("50 Mpx header", _png_claiming_size(10000, 5000), r"over the cap of 40 Mpx"),
    ("EPS (runs Ghostscript)", EPS, r"not an image in an accepted format \(PNG, JPEG"),
], ids=["100 Mpx", "50 Mpx", "EPS"])
def test_pixel_cap_and_format_allow_list(tmp_path, name, data, message):
    assert ImageLimits().max_pixels < 89_000_000 / 2  # well under Pillow's own 89 Mpx warning
    with pytest.raises(BadRowError, match=r"d\.tsv:3: base64 image cannot be decoded .*" + message):
        load_image_field(b64(data), tmp_path / "d.tsv", 3)


def test_the_pixel_cap_can_be_changed(tmp_path):
    field = b64(png(Image.new("RGB", (20, 20))))
    with pytest.raises(BadRowError, match=r"20x20 pixels .* over the cap"):
        load_image_field(field, tmp_path / "d.tsv", 1, ImageLimits(max_pixels=399))
    assert load_image_field(field, tmp_path / "d.tsv", 1, ImageLimits(max_pixels=400)).size == (20, 20)


def test_a_utf8_bom_is_not_part_of_the_first_idx(tmp_path):
    prompts = tmp_path / "prompts.tsv"
    prompts.write_bytes("\ufeffa\ta red circle\nb\ta cat\n".encode("utf-8"))
    assert read_prompts(prompts) == [("a", "a red circle"), ("b", "a cat")]
    train = tmp_path / "train.tsv"
    train.write_bytes(("\ufeff7\tcaption\t" + b64(png(Image.new("RGB", (4, 4)))) + "\n").encode("utf-8"))
    assert [row.idx for row in iter_rows(train)] == ["7"]
    assert [row["idx"] for row in TSVImageText(str(train), resolution=4)] == ["7"]


@pytest.mark.parametrize("stage", ["vqgan", "transformer"])
@pytest.mark.parametrize("flag", ["--data", "--val"])
def test_a_directory_as_data_is_a_clear_error_before_any_work(tmp_path, capsys, stage, flag):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    tsv = tmp_path / "ok.tsv"
    tsv.write_text("0\tc\tx\n")
    paths = {"--data": str(tsv), "--val": str(tsv), flag: str(tmp_path)}
    rc = cli.main([stage, "--data", paths["--data"], "--val", paths["--val"], "--config", "none.yaml",
                   "--out", str(tmp_path / "run")])
    assert rc == 2
    assert f"{flag} {tmp_path} is a directory; expected a TSV file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
