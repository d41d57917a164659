"""Tests of data.py: crops and their boxes, RoI correspondence, dataset layouts, masks, the synthetic set."""
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image  # test oracle only (installed with torchvision)
from torchvision.io import encode_jpeg, encode_png
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

# torchvision 0.29 warns on every decode/encode that its image I/O is deprecated (in favour of TorchCodec)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

# -----------------------------------------------------------------------------
# tiny files and images for the tests


def write_jpg(path, h=24, w=32, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path.write_bytes(bytes(encode_jpeg(img, quality=95).numpy()))


def write_grey_png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(encode_png(torch.as_tensor(labels, dtype=torch.uint8)[None]).numpy()))


def write_palette_png_pil(path, labels, palette):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    im.putpalette(palette)
    im.save(path)


def snapshot(root):
    """Every folder and file under root, with the files' bytes: equal snapshots = a byte-identical tree."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "dir") for p in Path(root).rglob("*")}


def non_utf8(folder, name):
    """folder / name where name holds bytes that are not UTF-8 (as a str, the way os.listdir returns it)."""
    return Path(folder) / os.fsdecode(name)


def smooth_image(h, w):
    """A smooth RGB image (low frequencies only), uint8 (3, H, W)."""
    y, x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    chans = [torch.sin(2 * math.pi * x / 97) * torch.cos(2 * math.pi * y / 83),
             torch.sin(2 * math.pi * (x + y) / 120 + 1.0),
             torch.cos(2 * math.pi * x / 150) + 0.5 * torch.sin(2 * math.pi * y / 61)]
    img = torch.stack([(c - c.min()) / (c.max() - c.min()) for c in chans])
    return (img * 255).round().to(torch.uint8)


# -----------------------------------------------------------------------------
# crops, boxes and correspondence


def test_crop_intersection_rois_hand_computed():
    box_g = torch.tensor([[0.0, 0.0, 100.0, 100.0], [10.0, 20.0, 210.0, 120.0]])
    box_v = torch.tensor([[50.0, 50.0, 150.0, 150.0], [60.0, 0.0, 100.0, 40.0]])
    roi_g, roi_v = data.crop_intersection_rois(box_g, box_v, 10, 5)
    # image 0: intersection (50,50,100,100); g: 10 cells over 100 px; v: 5 cells over 100 px
    assert torch.allclose(roi_g[0], torch.tensor([5.0, 5.0, 10.0, 10.0]))
    assert torch.allclose(roi_v[0], torch.tensor([0.0, 0.0, 2.5, 2.5]))
    # image 1: intersection (60,20,100,40); g: 10/200 per px in x, 10/100 in y; v: 5/40 in both
    assert torch.allclose(roi_g[1], torch.tensor([2.5, 0.0, 4.5, 2.0]))
    assert torch.allclose(roi_v[1], torch.tensor([0.0, 2.5, 5.0, 5.0]))


def roi_sample_counts(roi, output_size=7):
    """Bilinear samples per bin side of roi_align(aligned=True, sampling_ratio=-1), as torchvision's kernel computes
    them in float32: ceil(((x2 - 0.5) - (x1 - 0.5)) / output_size), for x and y. roi (N, 4) float32 -> (N, 2)."""
    start, end = roi[:, :2] - 0.5, roi[:, 2:] - 0.5
    return torch.ceil((end - start) / output_size)


def public_rois(box_g, box_v, size_g, size_v, patch_size=14):
    """The public NeCo code's RoI boxes (calculate_bboxes, then / patch_size in its training step), re-typed:
    crop size * ((intersection corner - crop x1y1) / crop wh) / patch_size, in float32."""
    lt = torch.max(box_g[:, :2], box_v[:, :2])
    rb = torch.min(box_g[:, 2:], box_v[:, 2:])

    def scaled(crop, size):
        wh = torch.stack((crop[:, 2] - crop[:, 0], crop[:, 3] - crop[:, 1]), 1)
        sizes = torch.tensor([float(size)] * 2)
        return torch.cat((sizes * ((lt - crop[:, :2]) / wh), sizes * ((rb - crop[:, :2]) / wh)), 1) / patch_size

    return scaled(box_g, size_g), scaled(box_v, size_v)


def test_roi_sample_counts_are_the_public_codes():
    """Adaptive roi_align takes ceil(bin side) samples, so the last bit of a box side matters: our boxes of real
    crops (518 and 98 px of COCO-like images) take the sample counts of the public formula, and a local crop inside
    a global one spans exactly 7.0 patches (1 sample per bin, checked with exact fractions)."""
    torch.manual_seed(0)
    mc, counted, inside = data.MultiCrop(), 0, 0
    naive_differs = 0
    for h, w in [(480, 640), (427, 640), (640, 480), (500, 375)]:
        img = torch.zeros(3, h, w, dtype=torch.uint8)
        for _ in range(60):
            boxes = mc.sample_boxes(img)[None]  # (1, 6, 4)
            for g in range(2):
                for v in range(6):
                    if v == g:
                        continue
                    size_v = 518 if v < 2 else 98
                    ours = data.crop_intersection_rois(boxes[:, g], boxes[:, v], 37, size_v // 14)
                    theirs = public_rois(boxes[:, g], boxes[:, v], 518, size_v)
                    for a, b in zip(ours, theirs):
                        assert torch.equal(roi_sample_counts(a), roi_sample_counts(b))
                        counted += 1
                    x1, y1, x2, y2 = (Fraction(int(x)) for x in boxes[0, v].tolist())
                    if v >= 2 and data.box_overlap(boxes[0, v].tolist(), boxes[0, g].tolist()) == (x2 - x1) * (y2 - y1):
                        # the local crop lies inside g: the intersection is the whole crop, in exact arithmetic
                        # 98 * ((x - x1) / w) / 14 = 0 and 7 on both axes, and the float32 boxes must be that exactly
                        exact = [98 * ((x - o) / (e - o)) / 14 for x, o, e in
                                 ((x1, x1, x2), (y1, y1, y2), (x2, x1, x2), (y2, y1, y2))]
                        assert exact == [0, 0, 7, 7] and ours[1][0].tolist() == [0.0, 0.0, 7.0, 7.0]
                        assert roi_sample_counts(ours[1]).tolist() == [[1.0, 1.0]]
                        naive = (boxes[0, v, 2:] - boxes[0, v, :2]) * (7 / (boxes[0, v, 2:] - boxes[0, v, :2]))
                        naive_differs += bool((naive != 7.0).any())
                        inside += 1
    assert counted == 2 * 4 * 60 * 10 and inside > 100
    assert naive_differs > 0.1 * inside  # the former grid / w * (x - x1) misses 7.0 (7.0000005: 2 samples)


def unnormalise(crop):
    mean = torch.tensor(data.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(data.IMAGENET_STD)[:, None, None]
    return crop * std + mean  # [0, 1]


def test_roi_align_on_crops_matches_roi_align_on_the_image():
    torch.manual_seed(0)
    img = smooth_image(240, 320)
    img01 = img.float()[None] / 255  # (1, 3, H, W)
    mc = data.MultiCrop(global_size=112, local_size=56, photometric=False)
    worst, worst_shifted = 0.0, float("inf")
    for _ in range(6):
        crops, boxes = mc(img)
        for g in range(2):
            for v in range(len(crops)):
                if v == g:
                    continue
                sg, sv = crops[g].shape[-1], crops[v].shape[-1]
                # the crop's pixel grid is its "feature map": grid side = crop side
                roi_g, roi_v = data.crop_intersection_rois(boxes[g:g + 1], boxes[v:v + 1], sg, sv, patch_size=1)
                inter = torch.cat([boxes[[g, v], :2].max(0).values, boxes[[g, v], 2:].min(0).values])  # (4,)
                # a fixed sampling ratio puts the samples at the same physical points in both crops (the adaptive
                # one of training need not: test_roi_sample_counts_are_the_public_codes)
                kw = dict(output_size=7, spatial_scale=1.0, sampling_ratio=2, aligned=True)
                ref = roi_align(img01, [inter[None]], **kw)
                out_g = roi_align(unnormalise(crops[g])[None], [roi_g], **kw)
                out_v = roi_align(unnormalise(crops[v])[None], [roi_v], **kw)
                worst = max(worst, (out_g - ref).abs().max().item(), (out_v - ref).abs().max().item())
                # negative control: the box of v shifted by a quarter of its size must NOT match
                shift = (roi_v[:, 2:] - roi_v[:, :2]) * 0.25
                out_shift = roi_align(unnormalise(crops[v])[None], [roi_v + torch.cat([shift, shift], 1)], **kw)
                worst_shifted = min(worst_shifted, (out_shift - ref).abs().max().item())
    assert worst < 0.02, worst  # resampling of a smooth image + uint8 rounding
    assert worst_shifted > 0.04, worst_shifted


def public_crop_boxes(img, n_local=4, min_intersection=0.01):
    """The public NeCo code's crop loop re-typed: torchvision's RandomResizedCrop.get_params
    for every crop, redrawn until its float32 intersection with each earlier global crop exceeds
    int(W * H * min_intersection) pixels, twice that for the second global crop. Boxes xyxy."""
    from torchvision.transforms import RandomResizedCrop
    scales = [(0.25, 1.0)] * 2 + [(0.05, 0.25)] * n_local
    boxes = torch.zeros(len(scales), 4)
    for i, scale in enumerate(scales):
        while True:
            y1, x1, h, w = RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
            box = torch.tensor([x1, y1, x1 + w, y1 + h], dtype=torch.float32)
            wh = (torch.min(box[2:], boxes[:min(i, 2), 2:]) - torch.max(box[:2], boxes[:min(i, 2), :2])).clamp(min=0)
            need = int(img.shape[-1] * img.shape[-2] * min_intersection) * (2 if i == 1 else 1)
            if i == 0 or bool(torch.all(wh[:, 0] * wh[:, 1] > need)):
                break
        boxes[i] = box
    return boxes


def test_crop_boxes_are_the_public_codes_for_the_same_seed():
    for h, w in [(480, 640), (427, 640), (640, 480), (120, 500)]:
        img = torch.zeros(3, h, w, dtype=torch.uint8)
        for seed in range(60):
            torch.manual_seed(seed)
            ours = data.MultiCrop().sample_boxes(img)
            torch.manual_seed(seed)
            assert torch.equal(ours, public_crop_boxes(img)), (h, w, seed)


def test_overlap_constraint_statistics():
    """Each local crop overlaps EACH global crop by more than 1% of the image (pixels truncated to an integer), the
    second global the first by more than 2%: local-vs-second-global overlaps between 1% and 2% occur, a
    second-vs-first-global overlap at or below 2% never does."""
    torch.manual_seed(1)
    mc = data.MultiCrop()  # the reference scales and threshold
    local_between, global_min = 0, float("inf")
    for h, w in [(240, 320), (480, 360), (100, 400)]:
        img = torch.zeros(3, h, w, dtype=torch.uint8)
        m = int(0.01 * h * w)
        for _ in range(300):
            b = mc.sample_boxes(img).tolist()
            assert len(b) == 6
            for x1, y1, x2, y2 in b:
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
                assert x1 == int(x1) and y2 == int(y2)
            assert data.box_overlap(b[1], b[0]) > 2 * m
            global_min = min(global_min, data.box_overlap(b[1], b[0]) / (h * w))
            for loc in b[2:]:
                assert data.box_overlap(loc, b[0]) > m and data.box_overlap(loc, b[1]) > m
                local_between += 0.01 < data.box_overlap(loc, b[1]) / (h * w) <= 0.02
                assert (loc[2] - loc[0]) * (loc[3] - loc[1]) <= 0.25 * h * w * 1.1  # local scale, up to rounding
    assert local_between > 20, local_between  # what the former "2% to the second global crop" rule excluded
    assert global_min > 0.02


def test_overlap_fallback_on_extreme_aspect_ratio_keeps_intersections_non_empty():
    torch.manual_seed(2)
    mc = data.MultiCrop(global_size=28, local_size=14, max_tries=10)
    img = torch.zeros(3, 10, 3000, dtype=torch.uint8)  # every crop is a tiny centre crop: 1% is unreachable
    crops, boxes = mc(img)
    assert len(crops) == 6 and boxes.shape == (6, 4)
    for v in range(1, 6):
        for g in range(2):
            if v != g:
                assert data.box_overlap(boxes[v].tolist(), boxes[g].tolist()) > 0


def test_multicrop_shapes_seeding_and_photometric():
    img = smooth_image(90, 120)
    mc = data.MultiCrop(global_size=42, local_size=28, n_local=3)
    torch.manual_seed(5)
    crops, boxes = mc(img)
    assert [tuple(c.shape) for c in crops] == [(3, 42, 42)] * 2 + [(3, 28, 28)] * 3
    assert boxes.shape == (5, 4) and boxes.dtype == torch.float32
    torch.manual_seed(5)
    crops2, boxes2 = mc(img)
    assert torch.equal(boxes, boxes2) and all(torch.equal(a, b) for a, b in zip(crops, crops2))
    # same seed without photometric augmentation: same boxes, but different pixels for some crop
    torch.manual_seed(5)
    plain, boxes3 = data.MultiCrop(global_size=42, local_size=28, n_local=3, photometric=False)(img)
    assert torch.equal(boxes, boxes3)
    assert any((a - b).abs().max() > 0.1 for a, b in zip(crops, plain))


# -----------------------------------------------------------------------------
# training images


def test_files_whose_names_are_not_utf8_are_read(tmp_path):
    jpg, png = non_utf8(tmp_path, b"caf\xe9_\xff.jpg"), non_utf8(tmp_path, b"m\xe4sk.png")
    write_jpg(jpg, 12, 16, seed=3)
    write_grey_png(png, np.arange(12).reshape(3, 4))
    with pytest.raises(UnicodeEncodeError):
        str(jpg).encode()  # what torchvision's read_file would need
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "plain.jpg").write_bytes(jpg.read_bytes())
    assert torch.equal(data.read_image(jpg), data.read_image(tmp_path / "sub" / "plain.jpg"))
    assert data.read_mask(png).tolist() == np.arange(12).reshape(3, 4).tolist()
    ds = data.TrainImages(tmp_path, None)
    assert jpg in ds.files and ds[ds.files.index(jpg)][0].shape == (3, 12, 16)  # read, not replaced


def test_home_folder_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jpg(tmp_path / "imgs" / "a.jpg", 8, 8)
    write_grey_png(tmp_path / "m.png", np.zeros((2, 2)))
    assert data.read_image("~/imgs/a.jpg").shape == (3, 8, 8) and data.read_mask("~/m.png").shape == (2, 2)
    assert data.list_images("~/imgs") == [tmp_path / "imgs" / "a.jpg"]
    assert len(data.TrainImages("~/imgs", None)) == 1
    (tmp_path / "ids.txt").write_text("b\n")
    assert data.select_ids(["a", "b"], ids_file="~/ids.txt") == ["b"]
    assert data.make_synthetic_voc("~/syn", n_images=2, image_size=16) == tmp_path / "syn" / "VOC2012"


def test_train_images_is_deterministic_per_item_and_leaves_the_global_rng_alone(tmp_path):
    for i in range(4):
        write_jpg(tmp_path / "sub" / f"img{i}.JPG" if i % 2 else tmp_path / f"img{i}.jpg", 40, 50, seed=i)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = data.TrainImages(tmp_path, data.MultiCrop(global_size=28, local_size=14), seed=3)
    assert len(ds) == 4 and all(p.suffix.lower() == ".jpg" for p in ds.files)
    state = torch.get_rng_state()
    a, n_unreadable = ds[2]
    [ds[i] for i in (0, 1, 3)]  # other items in between: item 2 must not change
    b = ds[2][0]
    assert torch.equal(torch.get_rng_state(), state) and n_unreadable == 0
    assert torch.equal(a[1], b[1]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    ds.set_epoch(1)
    c = ds[2][0]
    assert not torch.equal(a[1], c[1])
    other_seed = data.TrainImages(tmp_path, data.MultiCrop(global_size=28, local_size=14), seed=4)
    assert not torch.equal(a[1], other_seed[2][0][1])


def test_corrupt_images_are_replaced_deterministically_and_counted(tmp_path, capsys):
    write_jpg(tmp_path / "a_good.jpg", 30, 40, seed=1)
    write_jpg(tmp_path / "d_good.jpg", 30, 40, seed=2)
    (tmp_path / "b_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    good = (tmp_path / "a_good.jpg").read_bytes()
    (tmp_path / "c_truncated.jpg").write_bytes(good[: len(good) // 2])
    ds = data.TrainImages(tmp_path, data.MultiCrop(global_size=28, local_size=14, n_local=2), seed=5)
    items = [ds[i] for i in range(len(ds))]
    lines = capsys.readouterr().err.strip().splitlines()
    counts = [n for _, n in items]
    assert counts[0] == counts[3] == 0 and counts[1] >= 1 and counts[2] >= 1
    assert len(lines) == sum(counts)  # one warning per unreadable file met, naming it
    assert "b_bad.jpg" in lines[0] and "c_truncated.jpg" in lines[counts[1]]
    assert all("b_bad.jpg" in ln or "c_truncated.jpg" in ln for ln in lines)
    crops, boxes, n_unreadable = data.collate_multicrop(items)
    assert n_unreadable == sum(counts)
    assert [tuple(c.shape) for c in crops] == [(4, 3, 28, 28)] * 2 + [(4, 3, 14, 14)] * 2  # the batch keeps its size
    assert torch.equal(boxes[3], items[3][0][1])
    # the replacement of item 1 is a good image, cropped under item 1's seed: the same on every call and process
    again = ds[1][0]
    assert torch.equal(again[1], items[1][0][1]) and all(torch.equal(a, b) for a, b in zip(again[0], items[1][0][0]))
    as_good = []
    for name in ("a_good.jpg", "d_good.jpg"):
        with torch.random.fork_rng():
            torch.manual_seed(data.sample_seed(5, 0, 1))
            as_good.append(data.MultiCrop(global_size=28, local_size=14, n_local=2)(data.read_image(tmp_path / name)))
    assert any(torch.equal(again[1], b) and all(torch.equal(x, y) for x, y in zip(again[0], c)) for c, b in as_good)
    assert data.collate_multicrop([(None, data.READ_ATTEMPTS), items[0]]) == (None, None, data.READ_ATTEMPTS)


def test_a_folder_of_unreadable_files_gives_up_after_read_attempts(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"not an image")
    sample, n = data.TrainImages(tmp_path, data.MultiCrop(global_size=28, local_size=14))[0]
    assert sample is None and n == data.READ_ATTEMPTS
    assert len(capsys.readouterr().err.strip().splitlines()) == data.READ_ATTEMPTS


def test_train_images_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.TrainImages(tmp_path / "nowhere", None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="empty"):
        data.TrainImages(tmp_path / "empty", None)


def test_symlink_loops_are_listed_once_and_outside_links_followed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    for path in (root / "a" / "1.jpg", root / "a" / "b" / "2.jpg", root / "c" / "3.jpg", outside / "4.jpg"):
        write_jpg(path, 8, 8)
    (root / "a" / "b" / "up").symlink_to("../..")  # loop 1: back to root
    (root / "c" / "again").symlink_to(root / "c")  # loop 2: c inside itself
    (root / "a" / "self").symlink_to(".")  # a self-link
    (root / "linked").symlink_to(outside)  # a dataset linked in: followed
    # in a child process, killed if it does not finish (a looping walk grows by gigabytes a minute)
    code = "import json, sys, data; print(json.dumps([str(p) for p in data.list_images(sys.argv[1])]))"
    done = subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    found = [Path(p) for p in json.loads(done.stdout)]
    assert sorted(p.name for p in found) == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]  # each image once
    assert len({os.path.realpath(p) for p in found}) == 4 and root / "linked" / "4.jpg" in found


# -----------------------------------------------------------------------------
# segmentation datasets: masks (palette indices, never colours), layouts, label checks, fractions


def test_read_mask_returns_palette_indices_not_colours(tmp_path):
    labels = np.array([[0, 1, 2, 3], [255, 20, 3, 1]], dtype=np.uint8)
    # a palette whose colours (and their grey values) differ from the indices
    palette = []
    for i in range(256):
        palette += [(i * 37 + 11) % 256, (i * 91 + 5) % 256, (255 - i * 13) % 256]
    path = tmp_path / "m.png"
    write_palette_png_pil(path, labels, palette)
    mask = data.read_mask(path)
    assert mask.dtype == torch.int64 and mask.shape == (2, 4)
    assert mask.tolist() == labels.tolist()
    # the file really is a palette PNG: read as RGB it gives the palette colours
    rgb = data.read_image(path)
    assert rgb[:, 0, 1].tolist() == palette[3:6]


def test_read_mask_rejects_rgb_png(tmp_path):
    path = tmp_path / "rgb.png"
    path.write_bytes(bytes(encode_png(torch.zeros(3, 4, 4, dtype=torch.uint8)).numpy()))
    with pytest.raises(ValueError, match="rgb.png"):
        data.read_mask(path)


def make_voc_tree(base, ids_by_split, flat=False):
    """A tiny VOC tree; masks: palette PNG value = index of the id + 1, Aug mask = that + 10."""
    image_dir = base / ("images" if flat else "JPEGImages")
    sets = base / ("sets" if flat else "ImageSets/Segmentation")
    all_ids = sorted({i for ids in ids_by_split.values() for i in ids})
    for k, name in enumerate(all_ids):
        write_jpg(image_dir / f"{name}.jpg", 6, 8, seed=k)
        (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        (base / "SegmentationClass" / f"{name}.png").write_bytes(
            data.encode_palette_png(torch.full((6, 8), k + 1, dtype=torch.uint8)))
        write_grey_png(base / "SegmentationClassAug" / f"{name}.png", np.full((6, 8), k + 11))
    sets.mkdir(parents=True, exist_ok=True)
    for split, ids in ids_by_split.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return all_ids


def test_voc_devkit_layout_from_devkit_or_voc2012_root(tmp_path):
    all_ids = make_voc_tree(tmp_path / "VOCdevkit/VOC2012",
                            {"train": ["2007_000001", "2007_000003"], "val": ["2007_000002"],
                             "trainaug": ["2007_000001", "2007_000003", "2008_000009"]})
    for root in (tmp_path / "VOCdevkit", tmp_path / "VOCdevkit/VOC2012"):
        val = data.VOCSegmentation(root, "val")
        assert val.ids == ["2007_000002"] and val.num_classes == 21 and val.ignore_index == 255
        assert val.class_names[15] == "person"
        image, mask = val[0]
        assert image.shape == (3, 6, 8) and image.dtype == torch.uint8
        assert mask.dtype == torch.int64 and mask.unique().tolist() == [all_ids.index("2007_000002") + 1]
        aug = data.VOCSegmentation(root, "trainaug")
        assert len(aug) == 3
        assert aug[2][1].unique().tolist() == [all_ids.index("2008_000009") + 11]  # from SegmentationClassAug
        assert len(data.VOCSegmentation(root, "train")) == 2


def test_voc_flat_layout(tmp_path):
    make_voc_tree(tmp_path / "voc_flat", {"train": ["a", "b"], "val": ["c"], "trainaug": ["a", "b"]}, flat=True)
    val = data.VOCSegmentation(tmp_path / "voc_flat", "val")
    assert val.ids == ["c"] and val[0][1].unique().tolist() == [3]
    assert data.make_segmentation_dataset("voc", tmp_path / "voc_flat", "train").ids == ["a", "b"]


def test_voc_errors_name_the_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_voc.*JPEGImages"):
        data.VOCSegmentation(tmp_path / "missing_voc", "val")
    make_voc_tree(tmp_path / "VOC2012", {"train": ["a"]})
    with pytest.raises(FileNotFoundError, match=r"val\.txt"):
        data.VOCSegmentation(tmp_path, "val")
    with pytest.raises(ValueError, match="split"):
        data.VOCSegmentation(tmp_path, "test")


def test_labels_outside_the_classes_and_size_mismatches_name_the_file(tmp_path):
    make_voc_tree(tmp_path / "VOC2012", {"val": ["a", "b", "c"]})
    masks = tmp_path / "VOC2012" / "SegmentationClass"
    (masks / "a.png").write_bytes(data.encode_palette_png(torch.tensor([[0, 20, 255]], dtype=torch.uint8)))
    (masks / "b.png").write_bytes(data.encode_palette_png(torch.tensor([[0, 21, 255]], dtype=torch.uint8)))
    val = data.VOCSegmentation(tmp_path, "val")
    assert val.load_mask(0).tolist() == [[0, 20, 255]]  # the last class and void are fine
    with pytest.raises(ValueError, match=r"b\.png holds label 21, neither a class \(0\.\.20\)"):
        val[1]
    with pytest.raises(ValueError, match=r"a\.png is \(1, 3\) but its image is \(6, 8\)"):
        val[0]
    assert val[2][1].shape == (6, 8)
    write_grey_png(tmp_path / "ADEChallengeData2016/annotations/validation/x.png", np.array([[0, 150, 151]]))
    write_jpg(tmp_path / "ADEChallengeData2016/images/validation/x.jpg", 1, 3)
    with pytest.raises(ValueError, match=r"x\.png holds label 151"):
        data.ADE20k(tmp_path, "val")[0]


def test_ade20k_layout_and_ignore_index(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for sub, names in (("training", ["ADE_train_00000001", "ADE_train_00000002"]),
                       ("validation", ["ADE_val_00000001"])):
        for k, name in enumerate(names):
            write_jpg(base / "images" / sub / f"{name}.jpg", 5, 7, seed=k)
            write_grey_png(base / "annotations" / sub / f"{name}.png", np.array([[0, 150] * 3 + [k]] * 5))
    for root in (tmp_path, base):
        val = data.ADE20k(root, "val")
        assert val.ids == ["ADE_val_00000001"] and val.num_classes == 151 and val.ignore_index == 0
        assert len(val.class_names) == 151 and val.class_names[1] == "wall" and val.class_names[150] == "flag"
        assert val[0][1].unique().tolist() == [0, 150]
    assert len(data.make_segmentation_dataset("ade20k", tmp_path, "train")) == 2
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        data.ADE20k(tmp_path / "nope", "val")


def test_coco_tables_match_the_coco_category_ids():
    removed = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # ids unused in COCO 2017
    things = [i for ids in data.COCO_THING_SUPERCATEGORIES.values() for i in ids]
    stuff = [i for ids in data.COCO_STUFF_SUPERCATEGORIES.values() for i in ids]
    assert sorted(things) == sorted(set(range(1, 91)) - removed)  # 80 things, each once
    assert sorted(stuff) == list(range(92, 183))  # 91 stuff classes, each once
    assert sorted(data.COCO_THING_SUPERCATEGORIES) == ["accessory", "animal", "appliance", "electronic", "food",
                                                       "furniture", "indoor", "kitchen", "outdoor", "person",
                                                       "sports", "vehicle"]
    assert len(data.COCO_STUFF_SUPERCATEGORIES) == 15


def test_coco_things_and_stuff_mapping(tmp_path):
    # label-map values = category id - 1:
    # person(1), bicycle(2), bottle(44), banner(92), window-other(181), sky-other(157), unlabeled
    raw = np.array([[0, 1, 43, 91, 180, 156, 255]], dtype=np.uint8)
    for split in ("train", "val"):
        write_jpg(tmp_path / "images" / f"{split}2017" / "000000000139.jpg", 1, 7)
        write_grey_png(tmp_path / "stuffthingmaps_trainval2017" / f"{split}2017" / "000000000139.png", raw)
    things = data.make_segmentation_dataset("coco_things", tmp_path, "val")
    assert things.num_classes == 12 and things.ignore_index == 255
    # person -> 9, vehicle -> 11, kitchen -> 7; stuff and unlabeled ignored
    assert things[0][1].tolist() == [[9, 11, 7, 255, 255, 255, 255]]
    stuff = data.COCOStuffSeg(tmp_path, "train", kind="stuff")
    assert stuff.num_classes == 15 and stuff.class_names[11] == "textile"
    # things ignored; textile -> 11, window -> 14, sky -> 8
    assert stuff[0][1].tolist() == [[255, 255, 255, 11, 14, 8, 255]]
    with pytest.raises(FileNotFoundError, match="stuffthingmaps_trainval2017"):
        data.COCOStuffSeg(tmp_path / "nococo", "val")


def test_coco_reference_evaluator_layouts(tmp_path):
    # panoptic category ids: person 1, bicycle 2, bottle 44, banner 92 (stuff), unlabeled 0, wall-other-merged 199
    things_raw = np.array([[1, 2, 44, 92, 0, 199]], dtype=np.uint8)
    # stuff pixel maps: things 0, banner 92, window-other 181, sky-other 157, other 183
    stuff_raw = np.array([[0, 92, 181, 157, 183, 0]], dtype=np.uint8)
    write_jpg(tmp_path / "images" / "val2017" / "000000000139.jpg", 1, 6)
    write_grey_png(tmp_path / "annotations" / "val2017" / "000000000139.png", things_raw)
    write_grey_png(tmp_path / "annotations" / "stuff_annotations" / "stuff_val2017_pixelmaps" / "000000000139.png",
                   stuff_raw)
    things = data.make_segmentation_dataset("coco_things", tmp_path, "val")
    assert things[0][1].tolist() == [[9, 11, 7, 255, 255, 255]]  # person, vehicle, kitchen; stuff and 0 ignored
    stuff = data.make_segmentation_dataset("coco_stuff", tmp_path, "val")
    assert stuff[0][1].tolist() == [[255, 11, 14, 8, 255, 255]]  # textile, window, sky; things and other ignored


def write_cityscapes(root, split, city, n, raw, seed=0):
    for i in range(n):
        base = f"{city}_{i:06d}_000019"
        # JPEG bytes under the .png name: decoded by content, and not a lossless image the test could compare
        write_jpg(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", *raw.shape, seed=seed + i)
        write_grey_png(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png", raw)


def test_cityscapes_layout_and_train_ids(tmp_path):
    # labelIds: unlabeled 0, road 7, sidewalk 8, parking 9 (not evaluated), sky 23, car 26, bicycle 33, license plate
    raw = np.array([[0, 7, 8, 9, 23, 26, 33, 255]], dtype=np.uint8)
    write_cityscapes(tmp_path, "val", "lindau", 2, raw)
    write_cityscapes(tmp_path, "val", "frankfurt", 1, raw)
    val = data.make_segmentation_dataset("cityscapes", tmp_path, "val")
    assert val.num_classes == 19 and val.ignore_index == 255 and len(val) == 3
    assert val.class_names[:2] == ["road", "sidewalk"] and val.class_names[18] == "bicycle"
    assert val.ids[0] == "frankfurt_000000_000019" and val.ids[1] == "lindau_000000_000019"
    image, mask = val[1]
    assert image.shape == (3, 1, 8) and mask.tolist() == [[255, 0, 1, 255, 10, 13, 18, 255]]
    (tmp_path / "ids.txt").write_text("lindau_000001_000019\n")
    assert data.make_segmentation_dataset("cityscapes", tmp_path, "val", ids_file=tmp_path / "ids.txt").ids == [
        "lindau_000001_000019"]
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        data.make_segmentation_dataset("cityscapes", tmp_path, "train")


def test_fraction_sampling_sizes_determinism_and_ids_file(tmp_path):
    ids = [f"{i:04d}" for i in range(10)]
    make_voc_tree(tmp_path / "VOC2012", {"trainaug": ids})
    sizes = {f: len(data.VOCSegmentation(tmp_path, "trainaug", fraction=f)) for f in (1.0, 0.5, 0.25, 0.01)}
    assert sizes == {1.0: 10, 0.5: 5, 0.25: 3, 0.01: 1}  # round half up, at least 1
    assert data.select_ids(ids[::-1]) == ids[::-1] and data.select_ids([], 1.0) == []  # all of them, in their order
    a = data.VOCSegmentation(tmp_path, "trainaug", fraction=0.3, seed=0).ids
    assert a == data.VOCSegmentation(tmp_path, "trainaug", fraction=0.3, seed=0).ids
    assert len(set(a)) == 3 and set(a) <= set(ids) and a == sorted(a)
    others = {tuple(data.VOCSegmentation(tmp_path, "trainaug", fraction=0.3, seed=s).ids) for s in range(1, 6)}
    assert len(others | {tuple(a)}) > 1
    (tmp_path / "ids.txt").write_text("0007\n0002\n\n")
    listed = data.VOCSegmentation(tmp_path, "trainaug", fraction=0.1, ids_file=tmp_path / "ids.txt")
    assert listed.ids == ["0007", "0002"]  # the file wins over the fraction
    (tmp_path / "bad.txt").write_text("0001\n9999\n")
    with pytest.raises(ValueError, match="9999"):
        data.VOCSegmentation(tmp_path, "trainaug", ids_file=tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        data.VOCSegmentation(tmp_path, "trainaug", ids_file=tmp_path / "absent.txt")
    with pytest.raises(ValueError, match="fraction"):
        data.VOCSegmentation(tmp_path, "trainaug", fraction=0.0)


# -----------------------------------------------------------------------------
# the batched photometric augmentation against torchvision, crop by crop


def awkward_batch(n=6, h=23, w=31):
    """Random colours, quantised to uint8 levels (ties between channels), plus grey, black, white and saturated
    regions, where HSV has its special cases."""
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255
    x[:, :, :4] = x[:, :1, :4]                   # grey rows: r = g = b
    x[:, :, 4:6] = 0.0
    x[:, :, 6:8] = 1.0
    x[:, 0, 8:10], x[:, 1:, 8:10] = 1.0, 0.0     # pure red: max = r, min at two channels
    x[:, 1, 10:12] = x[:, 0, 10:12]              # r = g ties in colour pixels
    return x


BLEND_CASES = [(0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)]


@pytest.mark.parametrize("op,theirs", BLEND_CASES, ids=["brightness", "contrast", "saturation"])
def test_batched_blend_ops_match_torchvision(op, theirs):
    x = awkward_batch()
    factors = [0.2, 0.7, 1.0, 1.3, 1.8, 0.9]
    use = torch.tensor([True, True, True, True, True, False])      # the last crop is left as it is
    got = data.blend_step(x, torch.full((6,), op), use, torch.tensor(factors)[:, None].expand(6, 4))
    expected = torch.stack([theirs(img, f) for img, f in zip(x[:5], factors)] + [x[5]])
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-6)
    assert torch.equal(got[5], x[5])


def test_batched_hue_matches_torchvision():
    x = awkward_batch()
    shifts = [-0.2, -0.11, 0.0, 0.05, 0.13, 0.2]
    got = data.adjust_hue(x, torch.tensor(shifts))
    expected = torch.stack([TF.adjust_hue(img, f) for img, f in zip(x, shifts)])
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-6)


def test_batched_blur_matches_torchvision():
    x = awkward_batch()
    sigmas = [0.1, 0.45, 1.0, 1.37, 2.0, 0.8]
    got = data.gaussian_blur(x, torch.tensor(sigmas))
    expected = torch.stack([TF.gaussian_blur(img, [13, 13], [s, s]) for img, s in zip(x, sigmas)])
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-6)
    assert (got - x).abs().max() > 0.1                              # it did blur
    assert torch.equal(data.gaussian_blur(x, torch.tensor(sigmas)[:, None]), got)  # sigma (B, 1) as per_crop gives


def test_augment_batch_is_the_torchvision_pipeline_per_crop():
    """The whole augmentation with drawn parameters equals torchvision's functional ops applied crop by crop in
    the same order with the same factors (what v2.ColorJitter, RandomGrayscale and GaussianBlur do once their
    parameters are drawn), then Normalize."""
    n = 24
    crops = (awkward_batch(n) * 255).round().to(torch.uint8)
    params = data.photometric_params(n, torch.Generator().manual_seed(1))
    got = data.augment_batch(crops, params)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        img = TF.to_dtype(crops[i], torch.float32, scale=True)
        if params["jitter"][i]:
            for op_index in params["order"][i].tolist():
                img = ops[op_index](img, params["factors"][i, op_index].item())
        if params["gray"][i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if params["blur"][i]:
            sigma = params["sigma"][i].item()
            img = TF.gaussian_blur(img, [13, 13], [sigma, sigma])
        expected = TF.normalize(img, data.IMAGENET_MEAN, data.IMAGENET_STD)
        torch.testing.assert_close(got[i], expected, rtol=0, atol=3e-5)
    kinds = [(bool(params["jitter"][i]), bool(params["gray"][i]), bool(params["blur"][i])) for i in range(n)]
    assert len(set(kinds)) >= 4                                     # the draws covered several combinations


def test_photometric_params_follow_the_reference_distributions():
    n = 20000
    p = data.photometric_params(n, torch.Generator().manual_seed(0))
    for key, rate in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)):
        assert abs(p[key].float().mean().item() - rate) < 0.015, key
    assert torch.equal(p["order"].sort(dim=1).values, torch.arange(4).expand(n, 4))  # permutations
    first = torch.bincount(p["order"][:, 0], minlength=4).float() / n
    assert (first - 0.25).abs().max() < 0.015                       # every op first equally often
    low = torch.tensor([0.2, 0.2, 0.2, -0.2])
    high = torch.tensor([1.8, 1.8, 1.8, 0.2])
    f = p["factors"]
    assert (f >= low).all() and (f <= high).all()
    torch.testing.assert_close(f.mean(0), (low + high) / 2, rtol=0, atol=0.02)  # uniform
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0 and abs(p["sigma"].mean().item() - 1.05) < 0.02


def test_multicrop_on_device_gives_the_uint8_crops_of_the_plain_pipeline():
    img = smooth_image(90, 120)
    torch.manual_seed(5)
    plain, boxes = data.MultiCrop(global_size=42, local_size=28, n_local=3, photometric=False)(img)
    torch.manual_seed(5)
    raw, boxes2 = data.MultiCrop(global_size=42, local_size=28, n_local=3, on_device=True)(img)
    assert torch.equal(boxes, boxes2) and all(c.dtype == torch.uint8 for c in raw)
    # with every op off, augment_batch is to-float + Normalize: the loader's plain crops
    off = {"jitter": torch.zeros(1, dtype=torch.bool), "order": torch.arange(4)[None], "factors": torch.ones(1, 4),
           "gray": torch.zeros(1, dtype=torch.bool), "blur": torch.zeros(1, dtype=torch.bool),
           "sigma": torch.ones(1)}
    for c, expected in zip(raw, plain):
        torch.testing.assert_close(data.augment_batch(c[None], off)[0], expected, rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# palette PNGs and synthetic scenes

# the VOC colours of some classes, from the devkit's colour map: 0 background, 1 aeroplane, 2 bicycle, 3 bird,
# 4 boat, 7 car, 15 person, 20 tvmonitor, 255 void
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 7: (128, 128, 128),
               15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}


def test_encode_palette_png_is_a_voc_palette_png(tmp_path):
    labels = torch.tensor([[0, 1, 2, 15], [255, 20, 7, 0], [3, 3, 4, 255]], dtype=torch.uint8)
    path = tmp_path / "v.png"
    path.write_bytes(data.encode_palette_png(labels))
    with Image.open(path) as im:  # independent decoder
        assert im.mode == "P"
        assert np.array(im).tolist() == labels.tolist()
        pal = im.getpalette()
    assert len(pal) == 768 and all(tuple(pal[3 * c:3 * c + 3]) == rgb for c, rgb in VOC_COLOURS.items())
    assert data.voc_palette() == bytes(pal)
    assert data.read_mask(path).tolist() == labels.long().tolist()  # the palette indices ...
    rgb = data.read_image(path)  # ... and, read as RGB, the VOC colours
    assert all(tuple(rgb[:, y, x].tolist()) == VOC_COLOURS[int(labels[y, x])] for y in range(3) for x in range(4))
    # another palette is written as given
    grey = bytes(v for i in range(256) for v in (i, i, i))
    path.write_bytes(data.encode_palette_png(labels, grey))
    assert data.read_mask(path).tolist() == labels.long().tolist()
    assert data.read_image(path)[:, 1, 1].tolist() == [20, 20, 20]


def test_synthetic_voc_is_deterministic_and_in_voc_format(tmp_path):
    voc = data.make_synthetic_voc(tmp_path / "a", n_images=8, image_size=64, seed=0)
    assert voc == tmp_path / "a" / "VOC2012"
    same = data.make_synthetic_voc(tmp_path / "b", n_images=8, image_size=64, seed=0)
    other = data.make_synthetic_voc(tmp_path / "c", n_images=8, image_size=64, seed=1)
    files = sorted(p.relative_to(voc) for p in voc.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(same) for p in same.rglob("*") if p.is_file())
    assert all((voc / f).read_bytes() == (same / f).read_bytes() for f in files)
    assert (voc / "JPEGImages/syn_00000.jpg").read_bytes() != (other / "JPEGImages/syn_00000.jpg").read_bytes()

    train, val = data.VOCSegmentation(voc, "train"), data.VOCSegmentation(voc, "val")
    assert len(train) == 6 and len(val) == 2 and set(train.ids).isdisjoint(val.ids)
    assert data.VOCSegmentation(voc, "trainaug").ids == train.ids
    assert train.class_names == list(data.SYNTHETIC_CLASSES) and train.num_classes == 7
    assert len(data.TrainImages(voc / "JPEGImages", None)) == 8
    seen = set()
    for name in train.ids + val.ids:
        with Image.open(voc / "SegmentationClass" / f"{name}.png") as im:
            assert im.mode == "P"
        mask = data.read_mask(voc / "SegmentationClass" / f"{name}.png")
        assert torch.equal(mask, data.read_mask(voc / "SegmentationClassAug" / f"{name}.png"))
        assert data.read_image(voc / "JPEGImages" / f"{name}.jpg").shape == (3, 64, 64)
        seen |= set(mask.unique().tolist())
        # void rings: two 4-adjacent pixels never carry two different (non-void) labels
        for a, b in ((mask[:, 1:], mask[:, :-1]), (mask[1:], mask[:-1])):
            assert not ((a != b) & (a != 255) & (b != 255)).any()
    assert 255 in seen and 0 in seen and len(seen - {0, 255}) >= 3 and seen <= set(range(7)) | {255}


def test_synthetic_voc_skips_complete_sets_and_regenerates_on_change(tmp_path):
    voc = data.make_synthetic_voc(tmp_path, n_images=4, image_size=32, seed=0)
    jpg = voc / "JPEGImages" / "syn_00000.jpg"
    jpg.write_bytes(b"edited")  # a complete set is not rewritten ...
    data.make_synthetic_voc(tmp_path, n_images=4, image_size=32, seed=0)
    assert jpg.read_bytes() == b"edited"
    data.make_synthetic_voc(tmp_path, n_images=3, image_size=32, seed=0)  # ... a different one is
    assert jpg.read_bytes() != b"edited"
    assert sorted(p.name for p in (voc / "JPEGImages").iterdir()) == ["syn_00000.jpg", "syn_00001.jpg", "syn_00002.jpg"]
    data.make_synthetic_voc(tmp_path, n_images=3, image_size=32, seed=0, force=True)
    assert len(data.VOCSegmentation(voc, "train")) + len(data.VOCSegmentation(voc, "val")) == 3


def test_synthetic_data_is_never_written_into_a_folder_it_did_not_create(tmp_path):
    make_voc_tree(tmp_path / "real" / "VOC2012", {"train": ["2007_000032"], "val": ["2007_000033"]})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine")
    before = snapshot(tmp_path)
    for root in ("real", "real/VOC2012", "notes", "a_file"):
        with pytest.raises(FileNotFoundError, match=f"{tmp_path / root} is not empty and holds no synthetic set"):
            data.make_synthetic_voc(tmp_path / root, n_images=4, image_size=32)
    assert snapshot(tmp_path) == before
    (tmp_path / "empty").mkdir()
    voc = data.make_synthetic_voc(tmp_path / "empty", n_images=4, image_size=32)  # a new or empty folder is fine
    # an interrupted run of ours (marker written first, arguments last) is finished on the next call
    (voc / ".synthetic").write_text("incomplete")
    (voc / "JPEGImages" / "syn_00003.jpg").unlink()
    data.make_synthetic_voc(tmp_path / "empty", n_images=4, image_size=32)
    assert len(list((voc / "JPEGImages").iterdir())) == 4 and (voc / ".synthetic").read_text() != "incomplete"


def test_train_demo_refuses_a_dataset_in_its_synthetic_folder(tmp_path, monkeypatch, capsys):
    import train
    make_voc_tree(tmp_path / "data" / "synthetic" / "VOCdevkit" / "VOC2012", {"train": ["a"], "val": ["b"]})
    before = snapshot(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--config", str(ROOT / "config.yaml"), "--demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data/synthetic is not empty and holds no synthetic set")
    assert snapshot(tmp_path / "data") == before
