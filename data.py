"""
Data for NeCo.

1. Training: a folder of images (COCO train2017 or any folder), the NeCo multi-crop transform that records the box
   of every crop in original-image pixels, and the intersection boxes that make RoI-align sample the same physical
   region from two crops.
2. Evaluation: Pascal VOC 2012, ADE20k and COCO-Things/Stuff in the layouts users already have on disk, each item an
   (image uint8 (3, H, W), mask int64 (H, W)) pair.
3. A synthetic VOC-format set (textured shapes on textured backgrounds) for the offline demo and the tests.

Box convention everywhere: xyxy in continuous pixel coordinates, pixel column j spans [j, j + 1], so a crop of the
columns j..j+w-1 has x1 = j, x2 = j + w. Feature maps follow the same rule in patch units (cell i spans [i, i + 1]),
which is the convention of torchvision.ops.roi_align with aligned=True. Training samples it adaptively, as the public
run did (ceil(bin side) points per bin side), so the two crops of a pair may be sampled at different numbers of
points over the same region (crop_intersection_rois).
"""
import hashlib
import json
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, encode_png
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# what torchvision.io.decode_image reads (it has no BMP or TIFF decoder, so such files are not listed at all)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# -----------------------------------------------------------------------------
# reading images and masks


def decode_file(path, what, mode):
    """torchvision's decode_image on the bytes of a file. The bytes are read with open(), which takes every name the
    OS gives (torchvision's own read_file refuses names that are not UTF-8)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    raw = bytearray(path.read_bytes())
    try:
        return decode_image(torch.frombuffer(raw, dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as e:  # ValueError: an empty file
        raise RuntimeError(f"cannot decode {what} {path}: {str(e).splitlines()[0]}") from None


def read_image(path):
    """RGB uint8 (3, H, W). Grey, CMYK and alpha images become RGB; 16-bit PNGs are scaled to 8 bits."""
    img = decode_file(path, "image", ImageReadMode.RGB)
    if img.dtype != torch.uint8:
        img = TF.to_dtype(img, torch.uint8, scale=True)
    return img


def read_mask(path):
    """Class ids int64 (H, W) from a palette or single-channel PNG.

    decode_image with ImageReadMode.UNCHANGED returns the palette *indices* of a palette PNG (checked in the tests),
    which are the class ids of VOC; converting to RGB or grey would give palette colours instead.
    """
    mask = decode_file(path, "mask", ImageReadMode.UNCHANGED)
    if mask.shape[0] != 1:
        raise ValueError(f"mask {path} has {mask.shape[0]} channels: expected a palette or 1-channel PNG of class ids")
    return mask[0].long()  # (H, W)


# -----------------------------------------------------------------------------
# the NeCo multi-crop transform


def box_overlap(a, b):
    """Area of the intersection of two xyxy boxes given as sequences of 4 numbers (0 if they are disjoint)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


# the photometric augmentation of the reference run, drawn independently for every crop
JITTER, JITTER_P = (0.8, 0.8, 0.8, 0.2), 0.8  # ColorJitter(brightness, contrast, saturation, hue), applied with p
GREY_P = 0.2  # RandomGrayscale
BLUR_SIGMA, BLUR_P = (0.1, 2.0), 0.5  # GaussianBlur
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # 13: covers +-3 sigma of the largest sigma


class MultiCrop:
    """2 global + n_local RandomResizedCrops of one image, photometrically augmented, with their boxes.

    Returns (crops, boxes): crops a list of 2 + n_local float tensors (3, s, s), ImageNet-normalised, global crops
    first (on_device=True: uint8 tensors, neither augmented nor normalised, for augment_batch); boxes float32
    (2 + n_local, 4), xyxy in original-image pixels. No flips: a flip would break the box correspondence. All
    randomness comes from torch's global RNG, so seeding torch makes it reproducible.

    Overlap constraint, as the public NeCo code: with m = int(min_overlap * image area in pixels), the second global
    crop must overlap the first by more than 2 m pixels, and every local crop must overlap each of the two global
    crops by more than m. A crop is redrawn until it does. The public code redraws without limit (an image where the
    constraint cannot be met, e.g. 10 x 3000 px, hangs it); here after max_tries draws the second global crop takes
    the first one's box and a local crop the intersection of the two global boxes, so the intersections stay as large
    as they can be and never empty.
    """

    def __init__(self, global_size=518, local_size=98, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), n_local=4,
                 min_overlap=0.01, photometric=True, max_tries=100, on_device=False):
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        # on_device: crops stay uint8, not augmented or normalised; augment_batch does that on the training device
        self.on_device = on_device
        self.min_overlap, self.max_tries = min_overlap, max_tries
        # only the parameter sampling of RandomResizedCrop is used (make_params); the crop itself is resized_crop
        self.global_rrc = v2.RandomResizedCrop(global_size, scale=tuple(global_scale))
        self.local_rrc = v2.RandomResizedCrop(local_size, scale=tuple(local_scale))
        self.photometric = v2.Compose([
            v2.RandomApply([v2.ColorJitter(*JITTER)], p=JITTER_P),
            v2.RandomGrayscale(p=GREY_P),
            v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA)], p=BLUR_P),
        ]) if photometric else None
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def _sample(self, rrc, img):
        p = rrc.make_params([img])  # top, left, height, width (integers)
        return (float(p["left"]), float(p["top"]), float(p["left"] + p["width"]), float(p["top"] + p["height"]))

    def _sample_overlapping(self, rrc, img, anchors, min_pixels, fallback):
        for _ in range(self.max_tries):
            box = self._sample(rrc, img)
            if all(box_overlap(box, a) > min_pixels for a in anchors):
                return box
        return fallback

    def sample_boxes(self, img):
        """Boxes of all crops, float32 (2 + n_local, 4) xyxy in pixels of img (3, H, W), constraint applied."""
        m = int(img.shape[-2] * img.shape[-1] * self.min_overlap)  # pixels, truncated as the public code does
        g1 = self._sample(self.global_rrc, img)
        g2 = self._sample_overlapping(self.global_rrc, img, [g1], 2 * m, fallback=g1)
        both = (max(g1[0], g2[0]), max(g1[1], g2[1]), min(g1[2], g2[2]), min(g1[3], g2[3]))
        boxes = [g1, g2] + [self._sample_overlapping(self.local_rrc, img, [g1, g2], m, fallback=both)
                            for _ in range(self.n_local)]
        return torch.tensor(boxes, dtype=torch.float32)

    def crop(self, img, box, size):
        """Resized crop of img uint8 (3, H, W) over an integer xyxy box -> augmented, normalised float (3, s, s)."""
        x1, y1, x2, y2 = (int(round(v)) for v in box.tolist())
        out = TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [size, size], antialias=True)  # bilinear, uint8
        if self.on_device:
            return out
        out = TF.to_dtype(out, torch.float32, scale=True)  # [0, 1]
        if self.photometric is not None:
            out = self.photometric(out)
        return self.normalize(out)

    def __call__(self, img):
        boxes = self.sample_boxes(img)  # (V, 4)
        sizes = [self.global_size] * 2 + [self.local_size] * self.n_local
        crops = [self.crop(img, box, s) for box, s in zip(boxes, sizes)]
        return crops, boxes


# -----------------------------------------------------------------------------
# the same photometric augmentation for a whole batch on the training device
#
# In the loader, MultiCrop's ColorJitter + Gaussian blur cost 90-105 ms per image on one CPU core (`python bench.py
# augment`): 16 loader processes give fewer than 200 images/s, far below what one GPU trains. augment_batch draws the
# same random parameters per crop as MultiCrop's v2 pipeline (jitter p 0.8 with its 4 ops in a random order,
# grayscale p 0.2, blur p 0.5) and applies them to the whole (B, 3, s, s) batch at once. torchvision's functional
# ops take one factor per call, so the per-crop versions are written here; tests/test_data.py checks each against
# torchvision, crop by crop.

def photometric_params(n, gen):
    """Random parameters of n crops, drawn on gen's device: which ops apply, the jitter order and factors, the blur
    sigma. The same distributions as MultiCrop's torchvision pipeline."""
    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=gen, device=gen.device)

    b, c, s, h = JITTER
    return {
        "jitter": torch.rand(n, generator=gen, device=gen.device) < JITTER_P,
        "order": torch.rand(n, 4, generator=gen, device=gen.device).argsort(dim=1),  # a random permutation per crop
        "factors": torch.stack([uniform(1 - b, 1 + b), uniform(1 - c, 1 + c), uniform(1 - s, 1 + s),
                                uniform(-h, h)], dim=1),  # (n, 4): brightness, contrast, saturation, hue shift
        "gray": torch.rand(n, generator=gen, device=gen.device) < GREY_P,
        "blur": torch.rand(n, generator=gen, device=gen.device) < BLUR_P,
        "sigma": uniform(*BLUR_SIGMA),
    }


def per_crop(v):
    return v.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1), to broadcast over (B, C, H, W)


def luma(x):
    """(B, 3, H, W) -> (B, 1, H, W) with torchvision's rgb_to_grayscale weights."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def adjust_hue(x, shift):
    """Rotate the hue by shift (B,) turns, through HSV as torchvision (Pillow's conversion)."""
    r, g, b = x.unbind(1)
    v, low = x.amax(dim=1), x.amin(dim=1)  # (B, H, W)
    chroma = v - low
    s = chroma / torch.where(chroma > 0, v, 1.0)
    d = torch.where(chroma > 0, chroma, 1.0)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.remainder(h / 6.0 + shift.view(-1, 1, 1), 1.0)
    # back to RGB: channel n (r 5, g 3, b 1) = v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # made on the device: no host copy
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0, 1)


def blend_step(x, op, use, factors):
    """One ColorJitter op per crop among brightness (0), contrast (1), saturation (2) (ColorJitter's indices; 3 is
    hue), with factors (B, 4). All three are torchvision's blend r x + (1 - r) y, clamped to [0, 1], with y = 0,
    the mean grey level, the grey image; r = 1 (exactly x) where use is False."""
    grey = luma(x)  # (B, 1, H, W)
    y = torch.where(per_crop(op == 1), grey.mean(dim=(1, 2, 3), keepdim=True), grey) * per_crop(op != 0)
    r = per_crop(torch.where(use, factors.gather(1, op[:, None]).squeeze(1), 1.0))
    return (r * x + (1 - r) * y).clamp(0, 1)


def color_jitter(x, params):
    """ColorJitter with every crop's own op order and factors. The hue rotation is the expensive op, so it runs
    once for the whole batch: first each crop's blends that come before its hue step (3 slots; a crop with fewer
    gets identity blends), then the hue, then the blends after it (3 slots)."""
    on, order, factors = params["jitter"], params["order"], params["factors"]  # (B,), (B, 4), (B, 4)
    hue_at = (order == 3).int().argmax(dim=1, keepdim=True)  # (B, 1): the position of the hue op
    slot = torch.arange(3, device=x.device)[None]  # (1, 3)
    before, after = slot.expand_as(order[:, :3]), hue_at + 1 + slot  # (B, 3) positions in the order
    for positions, valid in ((before, before < hue_at), (after, after < 4)):
        ops = order.gather(1, positions.clamp(max=3))  # (B, 3)
        for i in range(3):
            x = blend_step(x, ops[:, i], on & valid[:, i], factors)
        if positions is before:
            x = torch.where(per_crop(on), adjust_hue(x, factors[:, 3]), x)
    return x


def gaussian_blur(x, sigma):
    """torchvision's GaussianBlur(13) with one sigma per crop: separable, reflect-padded. x (B, C, H, W)."""
    B, C, H, W = x.shape
    half = BLUR_KERNEL // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / per_crop(sigma).view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C, 13): one kernel per channel
    x = F.pad(x, (half, half, half, half), mode="reflect").reshape(1, B * C, H + 2 * half, W + 2 * half)
    x = F.conv2d(x, k.view(B * C, 1, 1, -1), groups=B * C)  # along W
    x = F.conv2d(x, k.view(B * C, 1, -1, 1), groups=B * C)  # along H
    return x.view(B, C, H, W)


def augment_batch(crops, params):
    """uint8 crops (B, 3, s, s) -> photometrically augmented, ImageNet-normalised float32 crops, with the
    parameters of photometric_params(B). Every op runs on the whole batch; torch.where keeps it for the crops that
    draw it (no data-dependent shapes, so the host never waits for the device)."""
    x = color_jitter(crops.float().div_(255), params)
    x = torch.where(per_crop(params["gray"]), luma(x).expand_as(x), x)
    x = torch.where(per_crop(params["blur"]), gaussian_blur(x, params["sigma"]), x)
    for c in range(3):  # Python scalars: a mean tensor would be copied from the host every step
        x[:, c].sub_(IMAGENET_MEAN[c]).div_(IMAGENET_STD[c])
    return x


def crop_intersection_rois(box_g, box_v, grid_g, grid_v, patch_size=14):
    """Intersection of crops g and v as RoI boxes in each crop's feature-map coordinates (patch units).

    box_g, box_v: (B, 4) xyxy in original-image pixels; grid_g, grid_v: the square feature-map side of each crop in
    patches (e.g. 37 and 7). Returns (roi_g, roi_v), each (B, 4), for
        roi_align(feat, torch.cat([torch.arange(B)[:, None], roi], 1), output_size=7, spatial_scale=1.0,
                  sampling_ratio=-1, aligned=True)
    roi_align's adaptive sampling (-1, the public run's) takes ceil(bin side) bilinear samples per bin side, so the
    two maps of a pair may take different sample counts (a 98 px crop's 7x7 bins 1 each, the same region on a 518 px
    crop's map mostly 2-4): that is how the public run compared them. The counts depend on the last bit of a box
    side (7.0 gives 1 sample, 7.0000005 gives 2), so the boxes are computed by the public code's float32 arithmetic.
    An empty intersection (prevented by MultiCrop's overlap constraint) gives a zero-size box.
    """
    x1 = torch.maximum(box_g[:, 0], box_v[:, 0])
    y1 = torch.maximum(box_g[:, 1], box_v[:, 1])
    x2 = torch.maximum(torch.minimum(box_g[:, 2], box_v[:, 2]), x1)
    y2 = torch.maximum(torch.minimum(box_g[:, 3], box_v[:, 3]), y1)
    inter = torch.stack([x1, y1, x2, y2], dim=1)  # (B, 4) original pixels
    return _to_feature_grid(inter, box_g, grid_g, patch_size), _to_feature_grid(inter, box_v, grid_v, patch_size)


def _to_feature_grid(boxes, crop, grid, patch_size):
    """Original pixels -> patch units of a crop resized to grid * patch_size pixels, in the public code's order of
    operations: crop side in pixels * ((x - crop x1) / crop width), then / patch size."""
    x1y1, wh = crop[:, None, :2], (crop[:, 2:] - crop[:, :2])[:, None]  # (B, 1, 2) each
    corners = boxes.view(-1, 2, 2)  # (B, 2 corners, xy)
    return (grid * patch_size * ((corners - x1y1) / wh) / patch_size).flatten(1)  # (B, 4)


# -----------------------------------------------------------------------------
# training images


def list_images(root):
    """All image files under root, recursively, sorted by path (case-insensitive extensions). Links to folders are
    followed (datasets are often linked in), but every real folder is read once: a link back up the tree would
    otherwise loop forever, and a second path to a folder would list its images twice."""
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(Path(root).expanduser(), followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames.clear()  # do not descend either
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        files += [Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def sample_seed(*parts):
    """A 63-bit seed that depends only on (seed, epoch, index[, attempt]): stable across processes and worker counts."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


READ_ATTEMPTS = 20  # an unreadable image is replaced at most this many times in a row before the loop gives up


class TrainImages(torch.utils.data.Dataset):
    """Unlabeled images under root (searched recursively) -> (transform(image), number of unreadable files met).

    Each item is augmented under its own RNG seed derived from (seed, epoch, index), so a sample's crops do not
    depend on the number of workers or on the order of loading: this is what makes a resumed run exact. An image
    that cannot be read (one warning line naming the file) is replaced by another image of the folder chosen from
    (seed, epoch, index, attempt), cropped under the seed of the index it replaces: batches keep their size, and one
    process draws the same replacements as N processes. After READ_ATTEMPTS unreadable files in a row the item is
    (None, READ_ATTEMPTS), and the training loop stops with an error.
    """

    def __init__(self, root, transform, seed=0):
        self.root, self.transform, self.seed, self.epoch = Path(root).expanduser(), transform, seed, 0
        if not self.root.is_dir():
            raise FileNotFoundError(f"training image folder {self.root} not found: expected a folder of images "
                                    f"(e.g. COCO train2017), searched recursively")
        self.files = list_images(self.root)
        if not self.files:
            raise FileNotFoundError(f"no image files ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under "
                                    f"{self.root}: point it at a folder of images")

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        for attempt in range(READ_ATTEMPTS):
            j = i if attempt == 0 else sample_seed(self.seed, self.epoch, i, attempt) % len(self.files)
            try:
                img = read_image(self.files[j])
            except (RuntimeError, ValueError, OSError) as e:
                print(f"warning: skipping unreadable image {self.files[j]} ({e})", file=sys.stderr, flush=True)
                continue
            with torch.random.fork_rng(devices=[]):
                # seed only the CPU generator: torch.manual_seed would also (lazily) reseed CUDA in the main process
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, i))
                return (self.transform(img) if self.transform is not None else img), attempt
        return None, READ_ATTEMPTS


def collate_multicrop(batch):
    """[((crops, boxes) or None, n_unreadable)] -> (crops: list of (B, 3, s, s) per view, boxes (B, V, 4),
    n_unreadable summed); crops and boxes are None when an item found no readable image."""
    n_unreadable = sum(n for _, n in batch)
    if any(sample is None for sample, _ in batch):
        return None, None, n_unreadable
    crops = [torch.stack([sample[0][v] for sample, _ in batch]) for v in range(len(batch[0][0][0]))]
    boxes = torch.stack([sample[1] for sample, _ in batch])  # (B, V, 4)
    return crops, boxes, n_unreadable


# -----------------------------------------------------------------------------
# segmentation datasets for evaluation

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

ADE20K_CLASSES = ("unlabeled,wall,building,sky,floor,tree,ceiling,road,bed,windowpane,grass,cabinet,sidewalk,person,"
                  "earth,door,table,mountain,plant,curtain,chair,car,water,painting,sofa,shelf,house,sea,mirror,rug,"
                  "field,armchair,seat,fence,desk,rock,wardrobe,lamp,bathtub,railing,cushion,base,box,column,signboard,"
                  "chest of drawers,counter,sand,sink,skyscraper,fireplace,refrigerator,grandstand,path,stairs,runway,"
                  "case,pool table,pillow,screen door,stairway,river,bridge,bookcase,blind,coffee table,toilet,flower,"
                  "book,hill,bench,countertop,stove,palm,kitchen island,computer,swivel chair,boat,bar,arcade machine,"
                  "hovel,bus,towel,light,truck,tower,chandelier,awning,streetlight,booth,television receiver,airplane,"
                  "dirt track,apparel,pole,land,bannister,escalator,ottoman,bottle,buffet,poster,stage,van,ship,"
                  "fountain,conveyer belt,canopy,washer,plaything,swimming pool,stool,barrel,basket,waterfall,tent,bag,"
                  "minibike,cradle,oven,ball,food,step,tank,trade name,microwave,pot,animal,bicycle,lake,dishwasher,"
                  "screen,blanket,sculpture,hood,sconce,vase,traffic light,tray,ashcan,fan,pier,crt screen,plate,"
                  "monitor,bulletin board,shower,radiator,glass,clock,flag").split(",")


def _ids(*spans):
    """_ids(1, (3, 5)) -> (1, 3, 4, 5): COCO category ids from singles and inclusive ranges."""
    return tuple(i for s in spans for i in (range(s[0], s[1] + 1) if isinstance(s, tuple) else [s]))


# COCO category id -> supercategory (COCO 2017 instances / COCO-Stuff categories), supercategories in alphabetical
# order, which is their class index (as in Leopart).
COCO_THING_SUPERCATEGORIES = {
    "accessory": _ids(27, 28, (31, 33)), "animal": _ids((16, 25)), "appliance": _ids((78, 82)),
    "electronic": _ids((72, 77)), "food": _ids((52, 61)), "furniture": _ids((62, 65), 67, 70),
    "indoor": _ids((84, 90)), "kitchen": _ids(44, (46, 51)), "outdoor": _ids(10, 11, (13, 15)), "person": _ids(1),
    "sports": _ids((34, 43)), "vehicle": _ids((2, 9)),
}
COCO_STUFF_SUPERCATEGORIES = {
    "building": _ids(95, 96, 128, 151, 158, 166), "ceiling": _ids(102, 103), "floor": _ids(101, (114, 118)),
    "food-stuff": _ids(121, 122, 153, 170),
    "furniture-stuff": _ids(98, 107, 108, 110, 112, 123, 130, 133, 156, 161, 165),
    "ground": _ids(111, 125, 126, 136, 140, 144, 145, 147, 149, 154, 159),
    "plant": _ids(94, 97, 119, 124, 129, 134, 142, 163, 169), "raw-material": _ids(100, 132, 139, 143),
    "sky": _ids(106, 157), "solid": _ids(127, 135, 150, 160, 162, 182), "structural": _ids(99, 113, 138, 146, 164),
    "textile": _ids(92, 93, 104, 105, 109, 131, 137, 141, 152, 167, 168), "wall": _ids((171, 177)),
    "water": _ids(120, 148, 155, 178, 179), "window": _ids(180, 181),
}


def select_ids(ids, fraction=1.0, seed=0, ids_file=None):
    """A train-set fraction: the ids listed in ids_file, else a seeded sample of round(fraction * len) ids (>= 1)."""
    if ids_file is not None:
        wanted, known = read_id_list(ids_file, "ids_file", "a text file with one image id per line"), set(ids)
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ValueError(f"ids_file {ids_file}: id '{unknown[0]}' is not in this split ({len(unknown)} unknown)")
        return wanted
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(ids)
    k = max(1, math.floor(fraction * len(ids) + 0.5))  # round half up (Python's round() would round half to even)
    pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return [ids[j] for j in pick.tolist()]


def read_id_list(path, what, layout):
    """The first word of every non-empty line of a text file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found: expected {layout}")
    # surrogateescape: an id that is not UTF-8 still names its file
    return [line.split()[0] for line in path.read_text(errors="surrogateescape").splitlines() if line.strip()]


class SegmentationFolder(torch.utils.data.Dataset):
    """(image uint8 (3, H, W), mask int64 (H, W)) pairs: image_dir/<id><image_ext> and mask_dir/<id>.png.

    lut, if given, maps raw mask values (0..255) to class ids (a 256-entry int64 table).
    """

    def __init__(self, ids, image_dir, mask_dir, class_names, ignore_index, image_ext=".jpg", lut=None):
        self.ids, self.image_dir, self.mask_dir = list(ids), Path(image_dir), Path(mask_dir)
        self.class_names, self.num_classes, self.ignore_index = list(class_names), len(class_names), ignore_index
        self.image_ext, self.lut = image_ext, lut

    def __len__(self):
        return len(self.ids)

    def image_path(self, i):
        return self.image_dir / f"{self.ids[i]}{self.image_ext}"

    def mask_path(self, i):
        return self.mask_dir / f"{self.ids[i]}.png"

    def load_mask(self, i):
        """Class ids (H, W) of item i. A value that is neither a class nor the ignore index is an error naming the
        file: it would change the mIoU without a word (a memory patch voting for a class that does not exist)."""
        path = self.mask_path(i)
        mask = read_mask(path)  # (H, W)
        if self.lut is not None:
            mask = self.lut[mask.clamp(0, 255)]
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            raise ValueError(f"mask {path} holds label {int(mask[bad][0])}, neither a class (0..{self.num_classes - 1})"
                             f" nor the ignore index {self.ignore_index}: check the dataset and its mask folder")
        return mask

    def __getitem__(self, i):
        image, mask = read_image(self.image_path(i)), self.load_mask(i)  # (3, H, W), (H, W)
        if mask.shape != image.shape[1:]:
            raise ValueError(f"mask {self.mask_path(i)} is {tuple(mask.shape)} but its image is "
                             f"{tuple(image.shape[1:])}")
        return image, mask


def _require_dir(path, what, layout):
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what} {path} not found: expected {layout}")


class VOCSegmentation(SegmentationFolder):
    """Pascal VOC 2012: 21 classes, 255 = void (ignored).

    root: VOCdevkit, VOCdevkit/VOC2012 (JPEGImages, SegmentationClass[Aug], ImageSets/Segmentation) or the flat
    variant (images, SegmentationClass[Aug], sets). split: train, val, or trainaug (masks from SegmentationClassAug).
    A class_names.txt in the root (one name per line, line = class id) replaces the VOC names (the synthetic set
    uses it).
    """
    LAYOUT = ("VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,SegmentationClassAug,ImageSets/Segmentation} or a flat "
              "folder with images/, SegmentationClass/, SegmentationClassAug/, sets/")

    def __init__(self, root, split="val", fraction=1.0, seed=0, ids_file=None):
        if split not in ("train", "val", "trainaug"):
            raise ValueError(f"VOC split must be train, val or trainaug, got '{split}'")
        root = Path(root)
        base = root / "VOC2012" if (root / "VOC2012").is_dir() else root
        if (base / "JPEGImages").is_dir():
            image_dir, sets_file = base / "JPEGImages", base / "ImageSets" / "Segmentation" / f"{split}.txt"
        elif (base / "images").is_dir():
            image_dir, sets_file = base / "images", base / "sets" / f"{split}.txt"
        else:
            raise FileNotFoundError(f"VOC root {root} not found or not a VOC folder: expected {self.LAYOUT}")
        mask_dir = base / ("SegmentationClassAug" if split == "trainaug" else "SegmentationClass")
        _require_dir(mask_dir, "VOC mask folder", self.LAYOUT)
        ids = read_id_list(sets_file, "VOC split file", f"the {split} id list of {self.LAYOUT}")
        names_file = base / "class_names.txt"
        names = names_file.read_text().split("\n") if names_file.is_file() else VOC_CLASSES
        names = [n.strip() for n in names if n.strip()]
        super().__init__(select_ids(ids, fraction, seed, ids_file), image_dir, mask_dir, names, ignore_index=255)


class ADE20k(SegmentationFolder):
    """ADE20k SceneParsing (ADEChallengeData2016): 151 classes, 0 = unlabeled = ignore_index.

    root: ADEChallengeData2016 or its parent; split train / val (folders training / validation).
    """
    LAYOUT = "ADEChallengeData2016/images/{training,validation}/*.jpg and annotations/{training,validation}/*.png"

    def __init__(self, root, split="val", fraction=1.0, seed=0, ids_file=None):
        if split not in ("train", "val"):
            raise ValueError(f"ADE20k split must be train or val, got '{split}'")
        root = Path(root)
        base = root if (root / "images").is_dir() else root / "ADEChallengeData2016"
        sub = {"train": "training", "val": "validation"}[split]
        image_dir, mask_dir = base / "images" / sub, base / "annotations" / sub
        _require_dir(image_dir, "ADE20k image folder", self.LAYOUT)
        _require_dir(mask_dir, "ADE20k annotation folder", self.LAYOUT)
        ids = sorted(p.stem for p in image_dir.glob("*.jpg"))
        if not ids:
            raise FileNotFoundError(f"no .jpg images in {image_dir}: expected {self.LAYOUT}")
        super().__init__(select_ids(ids, fraction, seed, ids_file), image_dir, mask_dir, ADE20K_CLASSES, ignore_index=0)


def coco_supercategory_lut(kind):
    """256-entry table: COCO-Stuff label-map value (category id - 1; 255 unlabeled) -> supercategory class or 255.

    Following Leopart: COCO-Things keeps the 12 thing supercategories and ignores (255) every stuff and unlabeled
    pixel; COCO-Stuff keeps the 15 stuff supercategories and ignores every thing pixel, the 'other' stuff class and
    unlabeled pixels. Supercategories are numbered in alphabetical order.
    """
    table = {"things": COCO_THING_SUPERCATEGORIES, "stuff": COCO_STUFF_SUPERCATEGORIES}[kind]
    lut = torch.full((256,), 255, dtype=torch.long)
    for index, name in enumerate(sorted(table)):
        for cat_id in table[name]:
            lut[cat_id - 1] = index
    return lut


class COCOStuffSeg(SegmentationFolder):
    """COCO-Things (12 classes) or COCO-Stuff (15 classes) from the COCO-Stuff label maps, 255 ignored.

    root: the COCO folder with images/{train2017,val2017} (or train2017/, val2017/ directly) and
    stuffthingmaps_trainval2017/{train2017,val2017}/*.png. The ids are the label maps present.
    """
    LAYOUT = "images/{train,val}2017/*.jpg and stuffthingmaps_trainval2017/{train,val}2017/*.png under the COCO root"

    def __init__(self, root, split="val", kind="things", fraction=1.0, seed=0, ids_file=None):
        if split not in ("train", "val"):
            raise ValueError(f"COCO split must be train or val, got '{split}'")
        if kind not in ("things", "stuff"):
            raise ValueError(f"COCO kind must be things or stuff, got '{kind}'")
        root = Path(root)
        image_dir = root / "images" / f"{split}2017"
        if not image_dir.is_dir() and (root / f"{split}2017").is_dir():
            image_dir = root / f"{split}2017"
        mask_dir = root / "stuffthingmaps_trainval2017" / f"{split}2017"
        _require_dir(image_dir, "COCO image folder", self.LAYOUT)
        _require_dir(mask_dir, "COCO-Stuff label-map folder", self.LAYOUT)
        ids = sorted(p.stem for p in mask_dir.glob("*.png"))
        if not ids:
            raise FileNotFoundError(f"no label maps (.png) in {mask_dir}: expected {self.LAYOUT}")
        names = sorted(COCO_THING_SUPERCATEGORIES if kind == "things" else COCO_STUFF_SUPERCATEGORIES)
        super().__init__(select_ids(ids, fraction, seed, ids_file), image_dir, mask_dir, names, ignore_index=255,
                         lut=coco_supercategory_lut(kind))


def make_segmentation_dataset(name, root, split, **kw):
    """name: voc | ade20k | coco_things | coco_stuff; kw: fraction, seed, ids_file."""
    if name == "voc":
        return VOCSegmentation(root, split, **kw)
    if name == "ade20k":
        return ADE20k(root, split, **kw)
    if name in ("coco_things", "coco_stuff"):
        return COCOStuffSeg(root, split, kind=name[5:], **kw)
    raise ValueError(f"unknown dataset '{name}': expected voc, ade20k, coco_things or coco_stuff")


# -----------------------------------------------------------------------------
# writing palette PNGs (the VOC mask format) without PIL


def voc_palette():
    """The VOC colour map, 768 bytes: the bits of the index spread over the high bits of R, G, B."""
    out = bytearray()
    for i in range(256):
        r = g = b = 0
        for bit in range(8):
            r |= ((i >> (3 * bit)) & 1) << (7 - bit)
            g |= ((i >> (3 * bit + 1)) & 1) << (7 - bit)
            b |= ((i >> (3 * bit + 2)) & 1) << (7 - bit)
        out += bytes((r, g, b))
    return bytes(out)


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_palette_png(labels, palette=None):
    """uint8 (H, W) class ids -> bytes of an 8-bit palette PNG (VOC colours by default).

    torchvision writes 8-bit grey PNGs; an 8-bit palette PNG stores the same bytes per pixel, so it only needs
    colour type 3 in the header and a PLTE chunk before the image data.
    """
    png = bytes(encode_png(labels[None].to(torch.uint8)).numpy())
    assert png[12:16] == b"IHDR", "unexpected PNG from torchvision.io.encode_png"
    header = bytearray(png[16:29])  # width, height, bit depth, colour type, ...
    header[9] = 3  # palette
    return png[:8] + _png_chunk(b"IHDR", bytes(header)) + _png_chunk(b"PLTE", palette or voc_palette()) + png[33:]


# -----------------------------------------------------------------------------
# synthetic scenes in the VOC 2012 devkit layout

SYNTHETIC_CLASSES = ("background", "striped disc", "checkered square", "dotted triangle", "speckled ellipse",
                     "ringed annulus", "hatched diamond")
# base colours: classes 1/2 share red and 3/4 share blue, so colour alone cannot tell them apart (texture and shape
# can); colours are jittered per object
_SYN_COLOURS = {1: (200, 60, 50), 2: (200, 60, 50), 3: (60, 90, 200), 4: (60, 90, 200), 5: (70, 170, 80),
                6: (210, 190, 60)}


def _uniform(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _shape(cls, u, v, r):
    """Inside-mask of the class's shape in the object frame (u, v), radius r."""
    if cls == 1:
        return u * u + v * v <= r * r  # disc
    if cls == 2:
        return torch.maximum(u.abs(), v.abs()) <= 0.85 * r  # square
    if cls == 3:  # equilateral triangle (three half-planes), inradius 0.6 r: about the area of the others
        return (v <= 0.6 * r) & (0.866 * u - 0.5 * v <= 0.6 * r) & (-0.866 * u - 0.5 * v <= 0.6 * r)
    if cls == 4:
        return (u / r) ** 2 + (v / (0.55 * r)) ** 2 <= 1  # ellipse
    if cls == 5:
        d = (u * u + v * v).sqrt()
        return (d <= r) & (d >= 0.5 * r)  # annulus
    return u.abs() + v.abs() <= r  # diamond


def _texture(cls, u, v, g):
    """Texture in [0, 1] of the class, in the object frame; periods of 5-8 px so a 14 px patch sees them."""
    if cls == 1:
        return 0.5 + 0.5 * torch.sin(2 * math.pi * u / 6)  # stripes
    if cls == 2:
        return ((torch.floor(u / 4) + torch.floor(v / 4)) % 2).float()  # checkerboard
    if cls == 3:
        du, dv = (u % 7) - 3.5, (v % 7) - 3.5
        return (du * du + dv * dv <= 2.0 ** 2).float()  # dots
    if cls == 4:
        noise = torch.rand((1, 1) + u.shape, generator=g)
        return (F.avg_pool2d(noise, 3, 1, 1, count_include_pad=False)[0, 0] - 0.5).mul(3).add(0.5).clamp(0, 1)
    if cls == 5:
        return 0.5 + 0.5 * torch.sin(2 * math.pi * (u * u + v * v).sqrt() / 5)  # concentric rings
    return (((u % 7) < 1.5) | ((v % 7) < 1.5)).float()  # cross-hatching


def _background(size, g):
    """A muted colour with low-frequency blotches and one of three textures: plain, waves or grain. (3, S, S)"""
    base = torch.tensor([_uniform(g, 50, 200) for _ in range(3)])
    blotches = F.interpolate(torch.randn(1, 3, 4, 4, generator=g) * 35, size=(size, size), mode="bilinear")[0]
    img = base[:, None, None] + blotches
    style = int(torch.randint(3, (), generator=g))
    if style == 1:
        ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        a, period = _uniform(g, 0, math.pi), _uniform(g, 12, 24)
        phase = 2 * math.pi * (xs * math.cos(a) + ys * math.sin(a)) / period + 2 * torch.sin(2 * math.pi * ys / 40)
        img = img + 15 * torch.sin(phase)
    elif style == 2:
        img = img + 12 * torch.randn(3, size, size, generator=g)
    return img


def _void_borders(labels):
    """Set to 255 every pixel whose 3x3 neighbourhood holds another label: a 2 px ring on every boundary, as VOC."""
    x = labels[None, None].float()
    hi = F.max_pool2d(x, 3, 1, 1)
    lo = -F.max_pool2d(-x, 3, 1, 1)
    out = labels.clone()
    out[(hi != lo)[0, 0]] = 255
    return out


def render_scene(size, g):
    """One synthetic scene from generator g: (image uint8 (3, S, S), labels uint8 (S, S) with 255 borders)."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")  # pixel centres
    img = _background(size, g)  # (3, S, S) float, 0..255 scale
    labels = torch.zeros(size, size, dtype=torch.uint8)
    for _ in range(int(torch.randint(2, 7, (), generator=g))):  # 2-6 objects, later ones occlude earlier ones
        cls = int(torch.randint(1, len(SYNTHETIC_CLASSES), (), generator=g))
        r = size * _uniform(g, 0.08, 0.26)
        cx, cy, theta = _uniform(g, 0, size), _uniform(g, 0, size), _uniform(g, 0, 2 * math.pi)
        u = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)  # object frame: rotated, centred
        v = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
        inside = _shape(cls, u, v, r)  # (S, S) bool
        light = torch.tensor(_SYN_COLOURS[cls]) * torch.tensor([_uniform(g, 0.8, 1.2) for _ in range(3)])
        dark = light * _uniform(g, 0.25, 0.5)
        pixels = dark[:, None, None] + (light - dark)[:, None, None] * _texture(cls, u, v, g)  # (3, S, S)
        img = torch.where(inside, pixels, img)
        labels[inside] = cls
    img = img + 4 * torch.randn(3, size, size, generator=g)  # sensor noise
    return img.round().clamp(0, 255).to(torch.uint8), _void_borders(labels)


def make_synthetic_voc(root="data/synthetic", n_images=200, image_size=160, seed=0, force=False):
    """Write a synthetic set in the VOC 2012 devkit layout under root/VOC2012 and return that folder.

    JPEGImages/*.jpg, SegmentationClass/*.png (palette), SegmentationClassAug/*.png (single channel, same labels),
    ImageSets/Segmentation/{train,trainaug,val}.txt (3/4 train = trainaug, 1/4 val) and class_names.txt. Image i
    depends only on (seed, i). The marker file VOC2012/.synthetic says the set is ours: it is written first and holds
    the arguments once the set is complete. Nothing is written when a previous call with the same arguments
    completed; otherwise (or with force) earlier syn_* files are removed first. A folder that is neither new, nor
    empty, nor one of our sets (a real dataset, say) is refused, never written into.
    """
    root = Path(root).expanduser()
    voc = root / "VOC2012"
    marker = voc / ".synthetic"
    params = json.dumps({"n_images": n_images, "image_size": image_size, "seed": seed, "version": 1})
    if marker.is_file():
        if not force and marker.read_text() == params:
            return voc
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        # FileNotFoundError: what train.py and evaluate.py report as one line
        raise FileNotFoundError(f"{root} is not empty and holds no synthetic set (no VOC2012/.synthetic): synthetic "
                                f"data is only written into a new or empty folder; pass another one")
    dirs = {d: voc / d for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    marker.write_text("incomplete")  # ours from here on; complete once it holds the arguments
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        for old in dirs[d].glob("syn_*"):
            old.unlink()
    ids, palette, threads = [f"syn_{i:05d}" for i in range(n_images)], voc_palette(), torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small gain nothing from threads, and lose a lot on a busy machine
    try:
        for i, name in enumerate(ids):
            img, labels = render_scene(image_size, torch.Generator().manual_seed(seed * 1_000_003 + i))
            (dirs["JPEGImages"] / f"{name}.jpg").write_bytes(bytes(encode_jpeg(img, quality=90).numpy()))
            (dirs["SegmentationClass"] / f"{name}.png").write_bytes(encode_palette_png(labels, palette))
            (dirs["SegmentationClassAug"] / f"{name}.png").write_bytes(bytes(encode_png(labels[None]).numpy()))
    finally:
        torch.set_num_threads(threads)
    n_train = math.floor(0.75 * n_images + 0.5)
    for split, split_ids in (("train", ids[:n_train]), ("trainaug", ids[:n_train]), ("val", ids[n_train:])):
        (dirs["ImageSets/Segmentation"] / f"{split}.txt").write_text("".join(f"{x}\n" for x in split_ids))
    (voc / "class_names.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    marker.write_text(params)
    return voc
