"""Streaming TSV reader: image encodings, preprocessing, bad rows, sharding, shuffling, bounded memory, output TSVs."""

import base64
import io
import os
import pickle
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tokenpaint.data import BadRowError, TSVImageText, iter_rows, read_prompts, write_output_tsv
from tokenpaint.data.tsv import decode_base64, shuffle_buffered


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64(img: Image.Image) -> str:
    return base64.b64encode(png_bytes(img)).decode()


def write_tsv(path, lines, newline="\n"):
    with open(path, "wb") as f:
        f.write("".join(line + newline for line in lines).encode("utf-8"))
    return str(path)


def solid(color, size=(8, 8)):
    return Image.new("RGB", size, color)


def simple_tsv(tmp_path, n, name="data.tsv"):
    return write_tsv(tmp_path / name, [f"id{i}\tcaption {i}\t{b64(solid((i, 2 * i, 3 * i)))}" for i in range(n)])


def test_standard_urlsafe_unpadded_and_path_images_read_identically(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(100):  # find noise whose base64 uses '+' and '/' and needs padding
        img = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), "RGB")
        data = png_bytes(img)
        std = base64.b64encode(data).decode()
        if "+" in std and "/" in std and std.endswith("="):
            break
    urlsafe_unpadded = base64.urlsafe_b64encode(data).decode().rstrip("=")
    os.makedirs(tmp_path / "images")
    img.save(tmp_path / "images" / "a.png")
    path = write_tsv(tmp_path / "d.tsv", [f"0\tstd\t{std}", f"1\turl\t{urlsafe_unpadded}",
                                          f"2\tstd nopad\t{std.rstrip('=')}", "3\tpath\timages/a.png"])
    items = list(TSVImageText(path, resolution=16))
    assert [it["idx"] for it in items] == ["0", "1", "2", "3"]
    assert [it["line"] for it in items] == [1, 2, 3, 4]
    assert [it["text"] for it in items] == ["std", "url", "std nopad", "path"]
    for it in items:
        assert it["image"].shape == (3, 16, 16) and it["image"].dtype == torch.float32
        assert torch.equal(it["image"], items[0]["image"])
    assert decode_base64(urlsafe_unpadded) == data


def test_resize_shorter_side_then_center_crop_and_range(tmp_path):
    wide = Image.new("RGB", (64, 16))
    tall = Image.new("RGB", (20, 80))
    for img, horizontal in ((wide, True), (tall, False)):
        w, h = img.size
        for k, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):  # red | green (the middle half) | blue
            start, stop = (0, 1, 3, 4)[k], (0, 1, 3, 4)[k + 1]
            box = (start * w // 4, 0, stop * w // 4, h) if horizontal else (0, start * h // 4, w, stop * h // 4)
            img.paste(color, box)
    path = write_tsv(tmp_path / "d.tsv", [f"w\twide\t{b64(wide)}", f"t\ttall\t{b64(tall)}",
                                          f"white\twhite\t{b64(solid((255, 255, 255), (30, 50)))}",
                                          f"black\tblack\t{b64(solid((0, 0, 0), (50, 30)))}"])
    wide_x, tall_x, white_x, black_x = (it["image"] for it in TSVImageText(path, resolution=8))
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8)
    assert torch.allclose(wide_x, green) and torch.allclose(tall_x, green)  # the crop keeps the middle
    assert torch.equal(white_x, torch.ones(3, 8, 8)) and torch.equal(black_x, -torch.ones(3, 8, 8))


def test_rgba_and_grayscale_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent -> white
    gray = Image.new("L", (8, 8), 0)
    path = write_tsv(tmp_path / "d.tsv", [f"0\ta\t{b64(rgba)}", f"1\tb\t{b64(gray)}"])
    a, b = (it["image"] for it in TSVImageText(path, resolution=8))
    assert torch.equal(a, torch.ones(3, 8, 8)) and torch.equal(b, -torch.ones(3, 8, 8))


def test_trailing_blank_lines_and_crlf_are_fine(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", [f"0\thello\t{b64(solid((1, 2, 3)))}", f"1\t你好\t{b64(solid((1, 2, 3)))}",
                                          "", "  "], newline="\r\n")
    items = list(TSVImageText(path, resolution=4))
    assert [(it["idx"], it["text"]) for it in items] == [("0", "hello"), ("1", "你好")]
    assert [r.line for r in iter_rows(path)] == [1, 2]


BAD_ROWS = {  # kind -> the bad line
    "columns": "7\tonly two columns",
    "text": f"7\t  \t{b64(solid((0, 0, 0)))}",
    "base64": "7\tbad base64\tQUJDR",  # 4k+1 characters cannot be base64
    "image": f"7\tnot an image\t{base64.b64encode(b'definitely not a PNG').decode()}",
    "path": "7\tmissing file\tno/such/image.png",
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_each_bad_row_kind_names_file_and_line_and_skip_counts_it(tmp_path, kind):
    good = [f"{i}\tok {i}\t{b64(solid((i, i, i)))}" for i in range(4)]
    path = write_tsv(tmp_path / "d.tsv", good[:2] + [BAD_ROWS[kind]] + good[2:])
    with pytest.raises(BadRowError) as info:
        list(TSVImageText(path, resolution=4))
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.path, err.line, err.kind) == (path, 3, kind)
    assert str(err).startswith(f"{path}:3: ")

    dataset = TSVImageText(path, resolution=4, bad_rows="skip")
    assert [it["line"] for it in dataset] == [1, 2, 4, 5]
    assert dataset.bad_rows_skipped == 1 and dataset.bad_row_counts == {kind: 1}
    assert "skipped 1 bad row" in dataset.summary() and kind in dataset.summary()


def test_messages_say_what_is_wrong(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", list(BAD_ROWS.values()))
    dataset = TSVImageText(path, resolution=4)
    messages = []
    for line in range(1, 6):
        try:
            dataset.load_row(line, open(path, "rb").read().splitlines()[line - 1])
        except BadRowError as e:
            messages.append(str(e))
    assert "2 tab-separated column(s), expected 3" in messages[0]
    assert "empty text" in messages[1]
    assert "not valid base64" in messages[2]
    assert "cannot be decoded" in messages[3]
    assert "cannot read image path 'no/such/image.png'" in messages[4]


def test_invalid_utf8_and_blank_line_in_the_middle_are_bad_rows(tmp_path):
    path = tmp_path / "d.tsv"
    row = f"\tx\t{b64(solid((0, 0, 0)))}\n".encode()
    path.write_bytes(b"0" + row + b"1\t\xff\xfe\tAAAA\n" + b"\n" + b"3" + row)
    with pytest.raises(BadRowError, match=r":2: not valid UTF-8"):
        list(TSVImageText(path, resolution=4))
    dataset = TSVImageText(path, resolution=4, bad_rows="skip")
    assert [it["line"] for it in dataset] == [1, 4]
    assert dataset.bad_row_counts == {"encoding": 1, "columns": 1}


def test_skip_counts_reach_the_main_process_through_dataloader_workers(tmp_path):
    lines = [f"{i}\tok\t{b64(solid((i, i, i)))}" if i % 3 else f"{i}\t\tAAAA" for i in range(12)]
    dataset = TSVImageText(write_tsv(tmp_path / "d.tsv", lines), resolution=4, bad_rows="skip")
    got = [int(line) for batch in DataLoader(dataset, batch_size=2, num_workers=2) for line in batch["line"]]
    assert sorted(got) == [i + 1 for i in range(12) if i % 3]
    assert dataset.bad_rows_skipped == 4 and dataset.bad_row_counts == {"text": 4}


def test_sharding_over_two_ranks_and_two_workers_covers_every_row_once(tmp_path):
    path = simple_tsv(tmp_path, 23)
    seen = []
    for rank in range(2):
        for shuffle in (False, True):
            dataset = TSVImageText(path, resolution=4, rank=rank, world_size=2, shuffle=shuffle, shuffle_buffer=4)
            lines = [it["line"] for it in DataLoader(dataset, batch_size=None, num_workers=2)]
            assert len(lines) == len(set(lines))
            seen.append(sorted(lines))
    assert seen[0] == seen[1] and seen[2] == seen[3]  # shuffling does not move rows across shards
    assert sorted(seen[0] + seen[2]) == list(range(1, 24))
    with pytest.raises(ValueError, match="rank=2"):
        next(iter(TSVImageText(path, resolution=4, rank=2, world_size=2)))


def test_seeded_shuffle_is_deterministic_and_changes_with_epoch(tmp_path):
    path = simple_tsv(tmp_path, 40)

    def order(seed=0, epoch=0):
        dataset = TSVImageText(path, resolution=4, shuffle=True, seed=seed, shuffle_buffer=8)
        dataset.set_epoch(epoch)
        return [it["line"] for it in dataset]

    first = order()
    assert first == order() and sorted(first) == list(range(1, 41))
    assert first != list(range(1, 41))
    assert order(epoch=1) != first and sorted(order(epoch=1)) == sorted(first)
    assert order(seed=1) != first


def test_shuffle_buffer_is_a_permutation_for_any_buffer_size():
    for size in (1, 3, 10, 100):
        out = list(shuffle_buffered(range(25), size, torch.Generator().manual_seed(size)))
        assert sorted(out) == list(range(25))


def test_reader_streams_in_bounded_memory(tmp_path):
    """A ~60 MB file is read with a Python allocation peak far below its size."""
    row_image = b64(solid((9, 9, 9), (4, 4)))
    caption = "a long caption that repeats " * 1400  # ~40 KB per row
    path = tmp_path / "big.tsv"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(1500):
            f.write(f"{i}\t{caption}{i}\t{row_image}\n")
    size = os.path.getsize(path)
    assert size > 55e6
    tracemalloc.start()
    try:
        count = sum(1 for _ in TSVImageText(path, resolution=4))
        count_text = sum(len(row.text) > 0 for row in iter_rows(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == count_text == 1500
    assert peak < 4e6, f"peak {peak / 1e6:.1f} MB while streaming a {size / 1e6:.0f} MB file"


def test_prompts_and_output_tsv_round_trip(tmp_path):
    prompts = write_tsv(tmp_path / "p.tsv", ["a\ta red circle", "b\t左边一个大的红色圆形", ""])
    assert read_prompts(prompts) == [("a", "a red circle"), ("b", "左边一个大的红色圆形")]
    images = [solid((255, 0, 0)), solid((0, 0, 255))]
    out = tmp_path / "out.tsv"
    write_output_tsv(out, [(idx, text, images) for idx, text in read_prompts(prompts)])
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    idx, text, field = lines[1].split("\t")
    assert (idx, text) == ("b", "左边一个大的红色圆形")
    decoded = [Image.open(io.BytesIO(base64.b64decode(part))) for part in field.split(",")]
    assert [np.asarray(im).tolist() for im in decoded] == [np.asarray(im).tolist() for im in images]
    with pytest.raises(ValueError, match="row 1: text 'x\\\\ty' contains a tab"):
        write_output_tsv(tmp_path / "bad.tsv", [("0", "x\ty", images[0])])
    assert not (tmp_path / "bad.tsv").exists()


def test_prompt_file_errors_name_the_line(tmp_path):
    path = write_tsv(tmp_path / "p.tsv", ["a\tfine", "just one column"])
    with pytest.raises(BadRowError, match=r"p\.tsv:2: 1 tab-separated column\(s\), expected 2 or 3"):
        read_prompts(path)
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        TSVImageText(tmp_path / "nope.tsv", resolution=4)
    with pytest.raises(ValueError, match="bad_rows must be"):
        TSVImageText(path, resolution=4, bad_rows="ignore")


def test_pickled_dataset_keeps_settings_and_counts(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", [f"0\tok\t{b64(solid((1, 1, 1)))}", "1\t\tAAAA"])
    dataset = TSVImageText(path, resolution=4, bad_rows="skip", shuffle=True, seed=5)
    assert len(list(dataset)) == 1
    copy = pickle.loads(pickle.dumps(dataset))
    assert (copy.path, copy.resolution, copy.seed, copy.bad_rows_skipped) == (path, 4, 5, 1)
    assert len(list(copy)) == 1 and copy.bad_rows_skipped == 2 and dataset.bad_rows_skipped == 1
