import json

import numpy as np
import pytest
from PIL import Image

from conftest import fail_on_nth_save, hash_tree
from entruth_lite import cli
from entruth_lite.core import data
from entruth_lite.core import emoji as emoji_data


def write_metadata(root, rows):
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_round_trip_keeps_pixels_and_captions(tmp_path):
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)) for i in range(3)]
    out = data.save_imagefolder(images, ["a", "b", "c"], tmp_path / "ds", file_names=["x.png", "y.png", "z.png"])
    loaded = data.load_imagefolder(out)
    assert loaded.captions == ["a", "b", "c"]
    assert loaded.file_names == ["x.png", "y.png", "z.png"]
    for original, back in zip(images, loaded.images()):
        assert np.array_equal(np.asarray(original), np.asarray(back))


def test_save_refuses_existing_folder_and_leaves_no_temp(tmp_path, small_dataset):
    with pytest.raises(FileExistsError, match="already exists"):
        data.save_imagefolder([Image.new("RGB", (4, 4))], ["x"], small_dataset)
    assert [p.name for p in tmp_path.iterdir()] == ["small"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    fail_on_nth_save(monkeypatch, 2)
    with pytest.raises(OSError, match="disk full"):
        data.save_imagefolder([Image.new("RGB", (4, 4))] * 3, ["a", "b", "c"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_loading_never_writes_into_the_source(small_dataset):
    before = hash_tree(small_dataset)
    data.load_imagefolder(small_dataset).images()
    assert hash_tree(small_dataset) == before


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"file_name": "a.png", "text": "ok"}', "{not json"], r"line 2: not valid JSON"),
        ([{"file_name": "a.png"}], r"line 1: row for 'a.png' has no 'text'"),
        ([{"file_name": "a.png", "text": "   "}], r"has no 'text'"),
        ([{"text": "caption"}], r"line 1: row has no 'file_name'"),
        ([{"file_name": "a.png", "text": "x"}, {"file_name": "a.png", "text": "y"}], r"duplicate file_name 'a.png'"),
        (['["a.png", "x"]'], r"expected a JSON object"),
        ([{"file_name": "../a.png", "text": "x"}], r"relative path inside"),
    ],
)
def test_bad_metadata_is_named(tmp_path, rows, message):
    root = tmp_path / "bad"
    write_metadata(root, rows)
    Image.new("RGB", (4, 4)).save(root / "a.png")
    with pytest.raises(data.DatasetError, match=message):
        data.load_imagefolder(root)


def test_missing_folder_metadata_and_image(tmp_path):
    with pytest.raises(data.DatasetError, match="dataset folder not found"):
        data.load_imagefolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetError, match="metadata.jsonl is missing"):
        data.load_imagefolder(tmp_path / "empty")
    write_metadata(tmp_path / "m", [{"file_name": "gone.png", "text": "x"}])
    with pytest.raises(data.DatasetError, match="image file not found: .*gone.png"):
        data.load_imagefolder(tmp_path / "m")


def test_corrupt_and_truncated_images_are_named(tmp_path):
    root = tmp_path / "c"
    write_metadata(root, [{"file_name": "junk.png", "text": "x"}])
    (root / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(data.DatasetError, match="cannot read image .*junk.png"):
        data.load_imagefolder(root)

    root = tmp_path / "t"
    write_metadata(root, [{"file_name": "cut.png", "text": "x"}])
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "cut.png")
    full = (root / "cut.png").read_bytes()
    (root / "cut.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(data.DatasetError, match="corrupt or truncated"):
        data.load_imagefolder(root)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16", "LA", "1"])
def test_non_rgb_modes_are_converted(tmp_path, mode):
    image = Image.new("RGB", (6, 6), (200, 30, 40)).convert(mode) if mode != "I;16" else Image.new("I;16", (6, 6), 65535)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    image.save(path)
    rgb = data.load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (6, 6)
    if mode == "I;16":
        assert np.asarray(rgb).min() == 255  # full-scale 16-bit white stays white


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(data.to_rgb(image)).tolist()[0][0] == [255, 255, 255]


def test_tensor_round_trip():
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    tensor = data.images_to_tensor([image])
    assert tensor.shape == (1, 3, 4, 4) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(data.tensor_to_images(tensor)[0]), np.asarray(image))


def test_emoji_splits_are_disjoint_fixed_and_large_enough():
    first, second = emoji_data.emoji_splits(), emoji_data.emoji_splits()
    assert [p for p, _ in first.owner] == [p for p, _ in second.owner]
    owner, probe, pretrain = ({p for p, _ in getattr(first, s)} for s in ("owner", "probe", "pretrain"))
    assert len(owner) >= 1000 and len(probe) >= 64 and len(pretrain) >= 2000
    assert not (owner & probe) and not (owner & pretrain) and not (probe & pretrain)
    families = lambda split: {emoji_data.family_key(p.stem) for p in split}
    assert not (families(owner) & families(pretrain)), "skin-tone variants must stay in one split"
    captions = dict(first.owner)
    assert all(c.startswith("an emoji of a") for c in captions.values())


def test_emoji_caption_from_unicode_name():
    assert emoji_data.emoji_caption("red apple") == "an emoji of a red apple"
    assert emoji_data.emoji_caption("owl") == "an emoji of an owl"
    assert emoji_data._unicode_name("1f34e") == "red apple"
    assert emoji_data._unicode_name("1f44d-1f3fd") == "thumbs up sign with medium skin tone"


def test_cli_writes_owner_dataset(tmp_path, capsys):
    out = tmp_path / "owner"
    assert cli.main(["data", "emoji", str(out)]) == 0
    dataset = data.load_imagefolder(out, check_images=False)
    assert len(dataset) >= 1000
    assert dataset.image(0).size == (32, 32)
    assert "CC-BY 4.0" in (out / "README.md").read_text()
    assert cli.main(["data", "emoji", str(out)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def test_import_a_captioned_dataset_of_any_image_form_at_a_resolution(tmp_path):
    """Rows as a Hugging Face ``datasets`` object yields them: a PIL image, or a dict of encoded bytes."""
    import io

    def encoded(size):
        buffer = io.BytesIO()
        Image.new("RGB", size, (200, 10, 10)).save(buffer, format="JPEG")
        return {"bytes": buffer.getvalue(), "path": None}

    rows = [{"image": Image.new("RGB", (300, 200), (10, 200, 10)), "text": "a green field", "license": "CC0", "id": 7},
            {"image": encoded((90, 160)), "text": " a red wall ", "license": "CC-BY", "id": 8},
            {"image": Image.new("RGBA", (64, 64)), "text": "nothing", "license": None, "id": 9}]
    out = data.import_captioned(rows, tmp_path / "imported", resolution=48)
    dataset = data.load_imagefolder(out)
    assert [im.size for im in dataset.images()] == [(48, 48)] * 3
    assert dataset.captions == ["a green field", " a red wall ", "nothing"], "captions exactly as given"
    assert dataset.extras[0] == {"license": "CC0", "id": 7} and dataset.extras[2] == {"id": 9}
    assert len(data.read_metadata(data.import_captioned(rows, tmp_path / "two", limit=2))) == 2
    with pytest.raises(data.DatasetError, match="row 0 has no column 'caption'"):
        data.import_captioned(rows, tmp_path / "x", caption_column="caption")
    with pytest.raises(data.DatasetError, match="row 1: the caption column 'text' is empty"):
        data.import_captioned([rows[0], {"image": rows[0]["image"], "text": "  "}], tmp_path / "y")
    with pytest.raises(data.DatasetError, match="row 0: the image column holds int"):
        data.import_captioned([{"image": 3, "text": "a"}], tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists(), "nothing written on a bad row"
