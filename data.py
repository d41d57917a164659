"""
Data for NeCo: the multi-crop transform that records every crop's box, training images and their loader, the
evaluation datasets (VOC, ADE20k, Cityscapes, COCO-Things/Stuff, SPair-71k pairs), the photometric augmentation batched
on the device, and synthetic sets in the VOC and SPair-71k layouts.

Box convention everywhere: xyxy in continuous pixel coordinates, pixel column j spans [j, j + 1], so a crop of the
columns j..j+w-1 has x1 = j, x2 = j + w. Feature maps follow the same rule in patch units (cell i spans [i, i + 1]),
which is the convention of torchvision.ops.roi_align with aligned=True.
"""
import hashlib, io, json, math, os, random, signal, sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, encode_png
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from model import IMAGENET_MEAN, IMAGENET_STD  # every backbone family's input normalisation

# the photometric augmentation of the public run, drawn independently for every crop
JITTER, JITTER_P = (0.8, 0.8, 0.8, 0.2), 0.8  # ColorJitter(brightness, contrast, saturation, hue), applied with p
GREY_P = 0.2  # RandomGrayscale
BLUR_SIGMA, BLUR_P = (0.1, 2.0), 0.5  # GaussianBlur
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # 13: covers +-3 sigma of the largest sigma

# -----------------------------------------------------------------------------
# the NeCo crops: 2 global + n local crops of one image, and the region two crops share
def box_overlap(a, b):
    """Intersection area of two xyxy boxes given as sequences of 4 numbers (0 if they are disjoint)."""
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)

class MultiCrop:
    """img uint8 (3, H, W) -> (crops, boxes): 2 global + n_local RandomResizedCrops (3, s, s), augmented and
    ImageNet-normalised (on_device: uint8, for augment_batch), and their boxes float32 (V, 4), xyxy in image pixels.
    No flips: they would break the box correspondence. The public code's overlap rule: with m = int(min_overlap *
    image pixels), the second global crop overlaps the first by more than 2 m pixels and each local crop both global
    ones by more than m, redrawn until it does. After max_tries draws (the public code loops forever, e.g. on a 10 x
    3000 px image) the second global crop takes the first's box and a local crop the global crops' intersection."""

    def __init__(self, global_size=518, local_size=98, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), n_local=4,
                 min_overlap=0.01, photometric=True, max_tries=100, on_device=False):
        self.sizes = [global_size] * 2 + [local_size] * n_local
        self.n_local, self.min_overlap, self.max_tries, self.on_device = n_local, min_overlap, max_tries, on_device
        # only their parameter sampling is used (make_params); the crop itself is TF.resized_crop
        self.global_rrc = v2.RandomResizedCrop(global_size, scale=tuple(global_scale))
        self.local_rrc = v2.RandomResizedCrop(local_size, scale=tuple(local_scale))
        self.augment = v2.Compose([v2.ToDtype(torch.float32, scale=True)] + ([
            v2.RandomApply([v2.ColorJitter(*JITTER)], p=JITTER_P), v2.RandomGrayscale(p=GREY_P),
            v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA)], p=BLUR_P),
        ] if photometric else []) + [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def draw(self, rrc, img, anchors=(), min_pixels=0, fallback=None):
        """A box of rrc that overlaps every anchor box by more than min_pixels, else fallback after max_tries."""
        for _ in range(self.max_tries):
            p = rrc.make_params([img])  # integer top, left, height, width
            box = (float(p["left"]), float(p["top"]), float(p["left"] + p["width"]), float(p["top"] + p["height"]))
            if all(box_overlap(box, a) > min_pixels for a in anchors):
                return box
        return fallback

    def sample_boxes(self, img):
        """The boxes of all crops of img, float32 (2 + n_local, 4), under the overlap rule."""
        m = int(img.shape[-2] * img.shape[-1] * self.min_overlap)  # pixels, truncated as the public code does
        g1 = self.draw(self.global_rrc, img)
        g2 = self.draw(self.global_rrc, img, [g1], 2 * m, fallback=g1)
        both = (max(g1[0], g2[0]), max(g1[1], g2[1]), min(g1[2], g2[2]), min(g1[3], g2[3]))
        local = [self.draw(self.local_rrc, img, [g1, g2], m, fallback=both) for _ in range(self.n_local)]
        return torch.tensor([g1, g2] + local, dtype=torch.float32)

    def __call__(self, img):
        boxes = self.sample_boxes(img)  # (V, 4), integer-valued
        crops = [TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [s, s], antialias=True)  # bilinear, uint8
                 for (x1, y1, x2, y2), s in zip(boxes.int().tolist(), self.sizes)]
        return (crops if self.on_device else [self.augment(c) for c in crops]), boxes

def crop_intersection_rois(box_g, box_v, grid_g, grid_v, patch_size=14):
    """The intersection of crops g and v (boxes (B, 4) in image pixels) as RoI boxes (B, 4) in each one's feature map
    (grid_g, grid_v: its side in patches, e.g. 37 and 7). Training samples them as the public run, roi_align with
    sampling_ratio=-1: ceil(bin side) points per bin side, so the two maps of a pair take different counts (a 98 px
    crop's 7x7 bins 1, the same region of a 518 px crop mostly 2-4), and a count depends on a box side's last bit
    (7.0 gives 1, 7.0000005 gives 2): hence the public code's float32 order, crop side * ((x - x1) / width) / patch.
    An empty intersection (the overlap rule prevents it) gives a zero-size box."""
    lt = torch.maximum(box_g[:, :2], box_v[:, :2])  # (B, 2)
    corners = torch.stack([lt, torch.maximum(torch.minimum(box_g[:, 2:], box_v[:, 2:]), lt)], dim=1)  # (B, 2, xy)

    def to_grid(crop, grid):
        x1y1, wh = crop[:, None, :2], (crop[:, 2:] - crop[:, :2])[:, None]  # (B, 1, 2) each
        return (grid * patch_size * ((corners - x1y1) / wh) / patch_size).flatten(1)  # (B, 4)
    return to_grid(box_g, grid_g), to_grid(box_v, grid_v)

# -----------------------------------------------------------------------------
# training images and their loader
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # what decode_image reads (it has no BMP or TIFF decoder)
READ_ATTEMPTS = 20  # an unreadable image is replaced at most this many times in a row before the loop gives up

def _require(what, layout, *folders):
    for folder in folders:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{what} folder {folder} not found: expected {layout}")

def decode_file(path, what, mode):
    """torchvision's decode_image on a file's bytes, read with open(), which takes every name the OS gives
    (torchvision's own read_file refuses names that are not UTF-8)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    try:
        return decode_image(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as e:  # ValueError: an empty file
        raise RuntimeError(f"cannot decode {what} {path}: {str(e).splitlines()[0]}") from None

def read_image(path):
    """RGB uint8 (3, H, W). Grey, CMYK and alpha images become RGB; 16-bit PNGs are scaled to 8 bits."""
    return TF.to_dtype(decode_file(path, "image", ImageReadMode.RGB), torch.uint8, scale=True)  # uint8 stays as it is

def list_images(root):
    """All image files under root, recursively, sorted. Links to folders are followed (datasets are often linked in),
    but every real folder is read once: a link back up the tree would loop forever, a second path list it twice."""
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(Path(root).expanduser(), followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames.clear()  # do not descend either
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()  # a folder with two paths is listed under the first one in sorted order, on every system
        files += [Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)

def sample_seed(*parts):
    """A 63-bit seed that depends only on (seed, epoch, index[, attempt]): stable across processes and worker counts."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1

class TrainImages(torch.utils.data.Dataset):
    """Images under root (searched recursively) -> (transform(image), number of unreadable files met). Item i is
    augmented under its own seed from (seed, epoch, i), whatever the workers and the loading order: this makes a
    resumed run exact. An unreadable image (one warning line naming it) is replaced by an image chosen from (seed,
    epoch, i, attempt), cropped under item i's seed: batches keep their size, and one process draws the same
    replacements as N. After READ_ATTEMPTS unreadable files in a row the item is (None, READ_ATTEMPTS)."""

    def __init__(self, root, transform, seed=0):
        self.root, self.transform, self.seed, self.epoch = Path(root).expanduser(), transform, seed, 0
        _require("training image", "a folder of images (e.g. COCO train2017), searched recursively", self.root)
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
    """[((crops, boxes) or None, n_unreadable)] -> (crops: a (B, 3, s, s) per view, boxes (B, V, 4), n_unreadable
    summed); crops and boxes are None when an item found no readable image."""
    n_unreadable = sum(n for _, n in batch)
    if any(sample is None for sample, _ in batch):
        return None, None, n_unreadable
    crops = [torch.stack(views) for views in zip(*(sample[0] for sample, _ in batch))]
    return crops, torch.stack([sample[1] for sample, _ in batch]), n_unreadable  # boxes (B, V, 4)

def epoch_batches(n_images, batch, epoch, seed, start=0, rank=0, world=1):
    """This rank's share of each batch of an epoch from batch `start` on; the order depends on (seed, epoch) only."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_rank = batch // world
    return [order[b * batch + rank * per_rank:b * batch + (rank + 1) * per_rank]
            for b in range(start, n_images // batch)]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

def ignore_stop_signals(worker_id):  # Ctrl-C signals the process group: the main process saves, then ends workers
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one that came while the worker started is dropped

def train_loader(dataset, batches, num_workers, pin_memory=False):
    """An iterator over the batches (collate_multicrop's); its workers start with the stop signals blocked (a signal
    between their fork and ignore_stop_signals would kill them), the main process gets a blocked one once they run."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate_multicrop, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None, worker_init_fn=ignore_stop_signals,
        generator=torch.Generator())  # its own generator: the loader never draws from the global RNG
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)  # (the workers fork here)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

# -----------------------------------------------------------------------------
# segmentation datasets for evaluation
VOC_CLASSES = tuple("background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
                    "motorbike person pottedplant sheep sofa train tvmonitor".split())
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

# COCO category id -> supercategory (COCO 2017 instances / COCO-Stuff categories); as in Leopart, a supercategory's
# class index is its place in alphabetical order
COCO_THING_SUPERCATEGORIES = {
    "accessory": (27, 28, *range(31, 34)), "animal": range(16, 26), "appliance": range(78, 83),
    "electronic": range(72, 78), "food": range(52, 62), "furniture": (*range(62, 66), 67, 70),
    "indoor": range(84, 91), "kitchen": (44, *range(46, 52)), "outdoor": (10, 11, *range(13, 16)), "person": (1,),
    "sports": range(34, 44), "vehicle": range(2, 10)}
COCO_STUFF_SUPERCATEGORIES = {
    "building": (95, 96, 128, 151, 158, 166), "ceiling": (102, 103), "floor": (101, *range(114, 119)),
    "food-stuff": (121, 122, 153, 170), "furniture-stuff": (98, 107, 108, 110, 112, 123, 130, 133, 156, 161, 165),
    "ground": (111, 125, 126, 136, 140, 144, 145, 147, 149, 154, 159),
    "plant": (94, 97, 119, 124, 129, 134, 142, 163, 169), "raw-material": (100, 132, 139, 143),
    "sky": (106, 157), "solid": (127, 135, 150, 160, 162, 182), "structural": (99, 113, 138, 146, 164),
    "textile": (92, 93, 104, 105, 109, 131, 137, 141, 152, 167, 168), "wall": range(171, 178),
    "water": (120, 148, 155, 178, 179), "window": (180, 181)}

def read_mask(path):
    """Class ids int64 (H, W) from a palette or 1-channel PNG: decode_image(UNCHANGED) gives a palette PNG's indices
    (VOC's class ids), where RGB or grey would give the palette's colours."""
    mask = decode_file(path, "mask", ImageReadMode.UNCHANGED)
    if mask.shape[0] != 1:
        raise ValueError(f"mask {path} has {mask.shape[0]} channels: expected a palette or 1-channel PNG of class ids")
    return mask[0].long()  # (H, W)

def read_id_list(path, what, layout):
    """The first word of every non-empty line (surrogateescape: an id that is not UTF-8 still names its file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found: expected {layout}")
    return [line.split()[0] for line in path.read_text(errors="surrogateescape").splitlines() if line.strip()]

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
    k = max(1, math.floor(fraction * len(ids) + 0.5))  # round half up (Python's round() would round half to even)
    pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return [ids[j] for j in pick.tolist()]

class SegmentationFolder(torch.utils.data.Dataset):
    """(image uint8 (3, H, W), mask int64 (H, W)) pairs from image_dir/<id>.jpg and mask_dir/<id>.png; lut, if
    given, maps the raw mask values (0..255) to class ids (a 256-entry int64 table)."""

    NAMES = ("{id}.jpg", "{id}.png")  # image and mask file names; {city}: the id's first word

    def __init__(self, ids, image_dir, mask_dir, class_names, ignore_index, lut=None):
        self.ids, self.image_dir, self.mask_dir, self.lut = list(ids), Path(image_dir), Path(mask_dir), lut
        self.class_names, self.num_classes, self.ignore_index = list(class_names), len(class_names), ignore_index

    def __len__(self):
        return len(self.ids)

    def paths(self, i):  # item i's image and mask files
        fields = {"id": self.ids[i], "city": self.ids[i].split("_")[0]}
        return self.image_dir / self.NAMES[0].format(**fields), self.mask_dir / self.NAMES[1].format(**fields)

    def load_mask(self, i):
        """Class ids (H, W) of item i. A value that is neither a class nor the ignore index is an error naming the
        file: it would change the mIoU without a word (a memory patch voting for a class that does not exist)."""
        path = self.paths(i)[1]
        mask = read_mask(path) if self.lut is None else self.lut[read_mask(path).clamp(0, 255)]  # (H, W)
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            raise ValueError(f"mask {path} holds label {int(mask[bad][0])}, neither a class (0..{self.num_classes - 1})"
                             f" nor the ignore index {self.ignore_index}: check the dataset and its mask folder")
        return mask

    def check_size(self, i, mask, image_hw):
        if tuple(mask.shape) != tuple(image_hw):
            raise ValueError(f"mask {self.paths(i)[1]} is {tuple(mask.shape)} but its image is {tuple(image_hw)}")
        return mask

    def __getitem__(self, i):
        image = read_image(self.paths(i)[0])  # (3, H, W)
        return image, self.check_size(i, self.load_mask(i), image.shape[1:])  # (H, W)

    def drop_unreadable(self):
        """Every mask decoded and checked, every image's header read (PIL) and its size compared with the mask's: wrong
        data raises ValueError (FileNotFoundError), an undecodable file leaves the ids -> the errors of those."""
        keep, failed = [], []
        for i in tqdm(range(len(self)), desc="checking files", leave=False, disable=None):  # a bar on a terminal only
            try:
                mask = self.load_mask(i)  # (H, W)
                with Image.open(self.paths(i)[0]) as im:
                    self.check_size(i, mask, (im.height, im.width))
                keep.append(self.ids[i])
            except FileNotFoundError:
                raise
            except (OSError, RuntimeError) as e:  # PIL's UnidentifiedImageError is an OSError
                failed.append(e)
        self.ids = keep
        return failed

class VOCSegmentation(SegmentationFolder):
    """Pascal VOC 2012: 21 classes, 255 void (ignored); split train, val or trainaug (SegmentationClassAug masks). A
    class_names.txt in the root (one name per line, line = class id) replaces the VOC names (the synthetic set's)."""
    LAYOUT = ("VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,SegmentationClassAug,ImageSets/Segmentation} or a flat "
              "folder with images/, SegmentationClass/, SegmentationClassAug/, sets/")

    def __init__(self, root, split="val", fraction=1.0, seed=0, ids_file=None):
        if split not in ("train", "val", "trainaug"):
            raise ValueError(f"VOC split must be train, val or trainaug, got '{split}'")
        base = Path(root) / "VOC2012" if (Path(root) / "VOC2012").is_dir() else Path(root)
        flat = (base / "images").is_dir() and not (base / "JPEGImages").is_dir()
        image_dir, sets = (base / d for d in (("images", "sets") if flat else ("JPEGImages", "ImageSets/Segmentation")))
        mask_dir = base / ("SegmentationClassAug" if split == "trainaug" else "SegmentationClass")
        _require("VOC", self.LAYOUT, image_dir, mask_dir)
        ids = read_id_list(sets / f"{split}.txt", "VOC split file", f"the {split} id list of {self.LAYOUT}")
        names = base / "class_names.txt"
        names = [n.strip() for n in names.read_text().splitlines() if n.strip()] if names.is_file() else VOC_CLASSES
        super().__init__(select_ids(ids, fraction, seed, ids_file), image_dir, mask_dir, names, ignore_index=255)

class ADE20k(SegmentationFolder):
    """ADE20k SceneParsing: 151 classes, 0 = unlabeled = ignore_index; root ADEChallengeData2016 or its parent."""
    LAYOUT = "ADEChallengeData2016/images/{training,validation}/*.jpg and annotations/{training,validation}/*.png"

    def __init__(self, root, split="val", fraction=1.0, seed=0, ids_file=None):
        base = Path(root) if (Path(root) / "images").is_dir() else Path(root) / "ADEChallengeData2016"
        sub = {"train": "training", "val": "validation"}[split]
        image_dir, mask_dir = base / "images" / sub, base / "annotations" / sub
        _require("ADE20k", self.LAYOUT, image_dir, mask_dir)
        ids = sorted(p.stem for p in image_dir.glob("*.jpg"))
        if not ids:
            raise FileNotFoundError(f"no .jpg images in {image_dir}: expected {self.LAYOUT}")
        super().__init__(select_ids(ids, fraction, seed, ids_file), image_dir, mask_dir, ADE20K_CLASSES, ignore_index=0)

def coco_supercategory_lut(kind, offset=1):
    """COCO mask value (category id - offset: 1 for the COCO-Stuff label maps, 0 for the reference evaluator's panoptic
    and stuff pixel maps) -> supercategory class; 255 (ignored) for the other kind, unlabeled pixels and the 'other'
    stuff class, as in Leopart. A 256-entry table."""
    table = {"things": COCO_THING_SUPERCATEGORIES, "stuff": COCO_STUFF_SUPERCATEGORIES}[kind]
    lut = torch.full((256,), 255, dtype=torch.long)
    for index, name in enumerate(sorted(table)):
        lut[torch.tensor(table[name]) - offset] = index
    return lut

class COCOStuffSeg(SegmentationFolder):
    """COCO-Things (12 classes) or COCO-Stuff (15), 255 ignored; the ids are the masks present: the COCO-Stuff label
    maps or the reference evaluator's (things: panoptic ids; stuff: pixel maps); images also in root/{train,val}2017."""
    LAYOUT = ("images/{train,val}2017/*.jpg and stuffthingmaps_trainval2017/{train,val}2017/*.png (or annotations/"
              "{train,val}2017, annotations/stuff_annotations/stuff_{train,val}2017_pixelmaps) under the COCO root")

    def __init__(self, root, split="val", kind="things", fraction=1.0, seed=0, ids_file=None):
        root = Path(root)
        image_dir, mask_dir = root / "images" / f"{split}2017", root / "stuffthingmaps_trainval2017" / f"{split}2017"
        theirs = root / "annotations" / (f"{split}2017" if kind == "things" else
                                         f"stuff_annotations/stuff_{split}2017_pixelmaps")
        mask_dir, offset = (theirs, 0) if not mask_dir.is_dir() and theirs.is_dir() else (mask_dir, 1)
        if not image_dir.is_dir() and (root / f"{split}2017").is_dir():
            image_dir = root / f"{split}2017"
        _require("COCO", self.LAYOUT, image_dir, mask_dir)
        ids = sorted(p.stem for p in mask_dir.glob("*.png"))
        if not ids:
            raise FileNotFoundError(f"no label maps (.png) in {mask_dir}: expected {self.LAYOUT}")
        names = sorted(COCO_THING_SUPERCATEGORIES if kind == "things" else COCO_STUFF_SUPERCATEGORIES)
        super().__init__(select_ids(ids, fraction, seed, ids_file), image_dir, mask_dir, names, ignore_index=255,
                         lut=coco_supercategory_lut(kind, offset))

# Cityscapes labelId -> trainId (the 19 evaluated classes); every other labelId is ignored (255)
CITYSCAPES_CLASSES = {7: "road", 8: "sidewalk", 11: "building", 12: "wall", 13: "fence", 17: "pole",
                      19: "traffic light", 20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky", 24: "person",
                      25: "rider", 26: "car", 27: "truck", 28: "bus", 31: "train", 32: "motorcycle", 33: "bicycle"}

class Cityscapes(SegmentationFolder):
    """Cityscapes fine annotations: 19 classes (trainIds from gtFine labelIds), 255 ignored. Ids are the base names
    (aachen_000000_000019), whose first word is the city folder, as the reference evaluator's subset files name them."""
    LAYOUT = "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/{train,val}/<city>/*_gtFine_labelIds.png"
    NAMES = ("{city}/{id}_leftImg8bit.png", "{city}/{id}_gtFine_labelIds.png")

    def __init__(self, root, split="val", fraction=1.0, seed=0, ids_file=None):
        image_dir, mask_dir = Path(root) / "leftImg8bit" / split, Path(root) / "gtFine" / split
        _require("Cityscapes", self.LAYOUT, image_dir, mask_dir)
        ids = sorted(p.name[:-len("_leftImg8bit.png")] for p in image_dir.glob("*/*_leftImg8bit.png"))
        if not ids:
            raise FileNotFoundError(f"no *_leftImg8bit.png images in {image_dir}/<city>: expected {self.LAYOUT}")
        lut = torch.full((256,), 255).scatter(0, torch.tensor(list(CITYSCAPES_CLASSES)), torch.arange(19))  # int64
        super().__init__(select_ids(ids, fraction, seed, ids_file), image_dir, mask_dir,
                         CITYSCAPES_CLASSES.values(), ignore_index=255, lut=lut)

def make_segmentation_dataset(name, root, split, **kw):
    """name: voc | ade20k | cityscapes | coco_things | coco_stuff; kw: fraction, seed, ids_file."""
    if name in ("coco_things", "coco_stuff"):
        return COCOStuffSeg(root, split, kind=name[5:], **kw)
    if name not in ("voc", "ade20k", "cityscapes"):
        raise ValueError(f"unknown dataset '{name}': expected voc, ade20k, cityscapes, coco_things or coco_stuff")
    return {"voc": VOCSegmentation, "ade20k": ADE20k, "cityscapes": Cityscapes}[name](root, split, **kw)

# -----------------------------------------------------------------------------
# MultiCrop's photometric augmentation, batched on the training device: in the loader it costs about 100 ms per image
# on one CPU core (`python bench.py augment`), far too slow to feed a GPU. torchvision's functional ops take one factor
# per call, so the per-crop versions are written here (the tests check each against torchvision, crop by crop).

def photometric_params(n, gen):
    """Random parameters of n crops on gen's device (which ops apply, jitter order and factors, blur sigma)."""
    def uniform(low=0.0, high=1.0):
        return low + (high - low) * torch.rand(n, generator=gen, device=gen.device)
    return {"jitter": uniform() < JITTER_P,
            "order": torch.rand(n, 4, generator=gen, device=gen.device).argsort(dim=1),  # a permutation per crop
            "factors": torch.stack([uniform(1 - j, 1 + j) for j in JITTER[:3]] + [uniform(-JITTER[3], JITTER[3])],
                                   dim=1),  # (n, 4): brightness, contrast, saturation, hue shift
            "gray": uniform() < GREY_P, "blur": uniform() < BLUR_P, "sigma": uniform(*BLUR_SIGMA)}

def per_crop(v):
    return v.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1), to broadcast over (B, C, H, W)

def luma(x):
    """(B, 3, H, W) -> (B, 1, H, W) with torchvision's rgb_to_grayscale weights."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)

def adjust_hue(x, shift):
    """Rotate the hue of x (B, 3, H, W) by shift (B,) turns, through HSV as torchvision (Pillow's conversion)."""
    r, g, b = x.unbind(1)
    v, low = x.amax(dim=1), x.amin(dim=1)  # (B, H, W)
    chroma = v - low
    s, d = chroma / torch.where(chroma > 0, v, 1.0), torch.where(chroma > 0, chroma, 1.0)  # saturation, safe divisor
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.remainder(h / 6.0 + shift.view(-1, 1, 1), 1.0)
    # back to RGB: channel n (r 5, g 3, b 1) = v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # made on the device: no host copy
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0, 1)

def blend_step(x, op, use, factors):
    """One ColorJitter op per crop, op (B,): brightness 0, contrast 1 or saturation 2 (3, hue, is adjust_hue). Each is
    torchvision's blend r x + (1 - r) y clamped to [0, 1], y = 0, the mean grey level or the grey image, with r the
    crop's factor from factors (B, 4), or 1 (x unchanged) where use is False."""
    grey = luma(x)  # (B, 1, H, W)
    y = torch.where(per_crop(op == 1), grey.mean(dim=(1, 2, 3), keepdim=True), grey) * per_crop(op != 0)
    r = per_crop(torch.where(use, factors.gather(1, op[:, None]).squeeze(1), 1.0))
    return (r * x + (1 - r) * y).clamp(0, 1)

def color_jitter(x, params):
    """ColorJitter with every crop's own op order and factors. The hue rotation is the expensive op, so it runs once
    for the whole batch: first each crop's blends before its hue step (3 slots; identity blends where a crop has
    fewer), then the hue, then the blends after it (3 slots)."""
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
    (B, C, H, W), half = x.shape, BLUR_KERNEL // 2
    k = torch.exp(-0.5 * (torch.arange(-half, half + 1, device=x.device, dtype=x.dtype) / sigma.reshape(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C, 13): one kernel per channel
    x = F.pad(x, (half, half, half, half), mode="reflect").reshape(1, B * C, H + 2 * half, W + 2 * half)
    x = F.conv2d(x, k.view(B * C, 1, 1, -1), groups=B * C)  # along W
    x = F.conv2d(x, k.view(B * C, 1, -1, 1), groups=B * C)  # along H
    return x.view(B, C, H, W)

def augment_batch(crops, params):
    """uint8 crops (B, 3, s, s) -> augmented, ImageNet-normalised float32 crops, with photometric_params(B). Every op
    runs on the whole batch and torch.where keeps it where drawn: no data-dependent shapes, the host never waits."""
    x = color_jitter(crops.float().div_(255), params)
    x = torch.where(per_crop(params["gray"]), luma(x).expand_as(x), x)
    x = torch.where(per_crop(params["blur"]), gaussian_blur(x, params["sigma"]), x)
    for c in range(3):  # Python scalars: a mean tensor would be copied from the host every step
        x[:, c].sub_(IMAGENET_MEAN[c]).div_(IMAGENET_STD[c])
    return x

# -----------------------------------------------------------------------------
# synthetic scenes in the VOC 2012 devkit layout
def voc_palette():
    """The VOC colour map, 768 bytes: bit 3k + c of the class index becomes bit 7 - k of colour channel c (RGB)."""
    return bytes(sum(((i >> (3 * k + c)) & 1) << (7 - k) for k in range(8)) for i in range(256) for c in range(3))

def encode_palette_png(labels, palette=None):
    """uint8 (H, W) class ids -> the bytes of an 8-bit palette PNG (VOC colours by default)."""
    im = Image.fromarray(labels.to(torch.uint8).numpy())  # mode L
    im.putpalette(palette or voc_palette())  # L -> P: the same bytes, now palette indices
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()

SYNTHETIC_CLASSES = ("background", "striped disc", "checkered square", "dotted triangle", "speckled ellipse",
                     "ringed annulus", "hatched diamond")
# base colours, jittered per object: classes 1/2 share red and 3/4 blue, so only texture and shape tell them apart
_COLOURS = {1: (200, 60, 50), 2: (200, 60, 50), 3: (60, 90, 200), 4: (60, 90, 200), 5: (70, 170, 80), 6: (210, 190, 60)}
# inside-masks and [0, 1] textures in an object's frame (u, v), r its radius; periods of 5-8 px: a 14 px patch sees them
_SHAPES = {
    1: lambda u, v, r: u * u + v * v <= r * r,  # disc
    2: lambda u, v, r: torch.maximum(u.abs(), v.abs()) <= 0.85 * r,  # square
    # equilateral triangle (three half-planes), inradius 0.6 r: about the area of the others
    3: lambda u, v, r: (v <= 0.6 * r) & (0.866 * u - 0.5 * v <= 0.6 * r) & (-0.866 * u - 0.5 * v <= 0.6 * r),
    4: lambda u, v, r: (u / r) ** 2 + (v / (0.55 * r)) ** 2 <= 1,  # ellipse
    5: lambda u, v, r: ((u * u + v * v).sqrt() <= r) & ((u * u + v * v).sqrt() >= 0.5 * r),  # annulus
    6: lambda u, v, r: u.abs() + v.abs() <= r}  # diamond
_TEXTURES = {
    1: lambda u, v, g: 0.5 + 0.5 * torch.sin(2 * math.pi * u / 6),  # stripes
    2: lambda u, v, g: ((torch.floor(u / 4) + torch.floor(v / 4)) % 2).float(),  # checkerboard
    3: lambda u, v, g: (((u % 7) - 3.5) ** 2 + ((v % 7) - 3.5) ** 2 <= 2.0 ** 2).float(),  # dots
    4: lambda u, v, g: ((F.avg_pool2d(torch.rand((1, 1) + u.shape, generator=g), 3, 1, 1, count_include_pad=False)
                         [0, 0] - 0.5) * 3 + 0.5).clamp(0, 1),  # speckles: smoothed noise, contrast stretched
    5: lambda u, v, g: 0.5 + 0.5 * torch.sin(2 * math.pi * (u * u + v * v).sqrt() / 5),  # concentric rings
    6: lambda u, v, g: (((u % 7) < 1.5) | ((v % 7) < 1.5)).float()}  # cross-hatching

def _uniform(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g).item()

def _void_borders(labels):
    """Set to 255 every pixel whose 3x3 neighbourhood holds another label: a 2 px ring on every boundary, as VOC."""
    x = labels[None, None].float()
    return labels.masked_fill((F.max_pool2d(x, 3, 1, 1) != -F.max_pool2d(-x, 3, 1, 1))[0, 0], 255)  # max != min

def render_scene(size, g):
    """One synthetic scene from generator g: (image uint8 (3, S, S), labels uint8 (S, S) with 255 borders)."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")  # pixel centres
    # background: a muted colour with low-frequency blotches, plain, with waves or with grain; (3, S, S), 0..255
    base = torch.tensor([_uniform(g, 50, 200) for _ in range(3)])[:, None, None]  # (3, 1, 1)
    img = base + F.interpolate(torch.randn(1, 3, 4, 4, generator=g) * 35, size=(size, size), mode="bilinear")[0]
    style = int(torch.randint(3, (), generator=g))
    if style == 1:
        a, period = _uniform(g, 0, math.pi), _uniform(g, 12, 24)
        phase = 2 * math.pi * (xs * math.cos(a) + ys * math.sin(a)) / period + 2 * torch.sin(2 * math.pi * ys / 40)
        img = img + 15 * torch.sin(phase)
    elif style == 2:
        img = img + 12 * torch.randn(3, size, size, generator=g)
    labels = torch.zeros(size, size, dtype=torch.uint8)
    for _ in range(int(torch.randint(2, 7, (), generator=g))):  # 2-6 objects, later ones occlude earlier ones
        cls = int(torch.randint(1, len(SYNTHETIC_CLASSES), (), generator=g))
        r = size * _uniform(g, 0.08, 0.26)
        cx, cy, theta = _uniform(g, 0, size), _uniform(g, 0, size), _uniform(g, 0, 2 * math.pi)
        u = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)  # object frame: rotated, centred
        v = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
        inside = _SHAPES[cls](u, v, r)  # (S, S) bool
        light = torch.tensor(_COLOURS[cls]) * torch.tensor([_uniform(g, 0.8, 1.2) for _ in range(3)])
        dark = light * _uniform(g, 0.25, 0.5)
        pixels = dark[:, None, None] + (light - dark)[:, None, None] * _TEXTURES[cls](u, v, g)  # (3, S, S)
        img = torch.where(inside, pixels, img)
        labels[inside] = cls
    img = img + 4 * torch.randn(3, size, size, generator=g)  # sensor noise
    return img.round().clamp(0, 255).to(torch.uint8), _void_borders(labels)

def write_synthetic_set(root, name, params, force, write):
    """root/name, where write(root/name) puts a synthetic set of these params unless a complete one is there (or force):
    its marker .synthetic, written first, holds them once complete. Other non-empty folders (real data) are refused."""
    root = Path(root).expanduser()
    folder, marker = root / name, root / name / ".synthetic"
    if marker.is_file() and not force and marker.read_text() == json.dumps(params):
        return folder
    if not marker.is_file() and root.exists() and (not root.is_dir() or any(root.iterdir())):
        # FileNotFoundError: what train.py and evaluate.py report as one line
        raise FileNotFoundError(f"{root} is not empty and holds no synthetic set (no {name}/.synthetic): synthetic "
                                f"data is only written into a new or empty folder; pass another one")
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text("incomplete")  # ours from here on; complete once it holds the params
    write(folder)
    marker.write_text(json.dumps(params))
    return folder

def make_synthetic_voc(root="data/synthetic", n_images=200, image_size=160, seed=0, force=False):
    """Write a synthetic set in the VOC devkit layout under root/VOC2012 and return that folder: palette masks in
    SegmentationClass, the same labels 1-channel in SegmentationClassAug, 3/4 train = trainaug, 1/4 val; image i
    depends on (seed, i) only. Kept unless the arguments change or force (see write_synthetic_set)."""
    params = {"n_images": n_images, "image_size": image_size, "seed": seed, "version": 1}
    return write_synthetic_set(root, "VOC2012", params, force, lambda voc: _write_voc(voc, n_images, image_size, seed))

def _write_voc(voc, n_images, image_size, seed):
    images, masks, aug, sets = (voc / d for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug",
                                                  "ImageSets/Segmentation"))
    for d in (images, masks, aug, sets):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("syn_*"):
            old.unlink()
    ids, palette, threads = [f"syn_{i:05d}" for i in range(n_images)], voc_palette(), torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small gain nothing from threads, and lose a lot on a busy machine
    try:
        for i, name in enumerate(ids):
            img, labels = render_scene(image_size, torch.Generator().manual_seed(seed * 1_000_003 + i))
            (images / f"{name}.jpg").write_bytes(bytes(encode_jpeg(img, quality=90).numpy()))
            (masks / f"{name}.png").write_bytes(encode_palette_png(labels, palette))
            (aug / f"{name}.png").write_bytes(bytes(encode_png(labels[None]).numpy()))
    finally:
        torch.set_num_threads(threads)
    n_train = math.floor(0.75 * n_images + 0.5)
    for split, split_ids in (("train", ids[:n_train]), ("trainaug", ids[:n_train]), ("val", ids[n_train:])):
        (sets / f"{split}.txt").write_text("".join(f"{x}\n" for x in split_ids))
    (voc / "class_names.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")

# -----------------------------------------------------------------------------
# SPair-71k keypoint pairs, and synthetic pairs in its layout made by known affine warps
SPAIR_CATEGORIES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog",
                    "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor")
SPAIR_LAYOUT = "JPEGImages/<category>/*.jpg, ImageAnnotation/<category>/*.json and PairAnnotation/<split>/*.json"
SPAIR_BINS = ("0", "1", "2", "all")  # the pairs' viewpoint_variation, and every pair

def spair_pairs(root, split="test", per_bin=None):
    """{(category, bin): the pair annotations}, read sorted by name (a folder listing's order differs between systems).
    per_bin: Probe3D's subset of every (category, bin): random.seed(20), shuffle, the first per_bin."""
    folder = Path(root) / "PairAnnotation" / split
    _require("SPair-71k pair", SPAIR_LAYOUT, folder)
    pairs, chosen = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))], {}
    if not pairs:
        raise FileNotFoundError(f"no pair annotations (.json) in {folder}: expected {SPAIR_LAYOUT}")
    for key in sorted({(p["category"], b) for p in pairs for b in ("all", str(p["viewpoint_variation"]))}):
        chosen[key] = [p for p in pairs if p["category"] == key[0] and key[1] in ("all", str(p["viewpoint_variation"]))]
        if per_bin:
            random.Random(20).shuffle(chosen[key])  # the sequence of random.seed(20); random.shuffle
    return {key: ps[:per_bin] for key, ps in chosen.items()}

def spair_view(root, category, name, size):
    """An image padded bottom/right to a square with white, resized to size (PIL bicubic, antialiased), and its
    keypoints (K, 3) int64 (x, y, visible) from ImageAnnotation, truncated to whole pixels before and after scaling."""
    with Image.open(Path(root) / "JPEGImages" / category / f"{name}.jpg") as im:
        im, side = im.convert("RGB"), max(im.size)
    square = ImageOps.expand(im, (0, 0, side - im.width, side - im.height), fill=(255, 255, 255))
    kps = json.loads((Path(root) / "ImageAnnotation" / category / f"{name}.json").read_text())["kps"]
    kps = torch.tensor([[int(xy[0]), int(xy[1]), 1] if xy else [0, 0, 0]
                        for xy in (kps[str(k)] for k in range(len(kps)))])  # "0".."K-1": [x, y] or null
    kps[:, :2] = (kps[:, :2] * size / side).long()
    return TF.pil_to_tensor(square.resize((size, size), Image.BICUBIC)), kps  # (3, size, size), (K, 3)

def affine_warp(img, A, b, out_hw, fill=128.0):
    """img uint8 (3, H, W) warped onto an out_hw canvas: the continuous pixel point p lands on A p + b (float64)."""
    (H, W), (h, w) = img.shape[1:], out_hw
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")  # target pixel centres
    src = (torch.stack([xs, ys], -1).double() - b) @ torch.linalg.inv(A).T  # (h, w, 2) xy
    grid = (src / torch.tensor([W, H]) * 2 - 1)[None].float()  # align_corners=False: -1, 1: the outer pixel edges
    out = F.grid_sample(img[None].float() - fill, grid, mode="bilinear", align_corners=False)[0] + fill
    return out.round().clamp(0, 255).to(torch.uint8)

def make_synthetic_spair(root="data/synthetic_spair", n_categories=2, n_pairs=6, image_size=160, n_kps=10, seed=0,
                         force=False):
    """SPair-71k's layout under root/SPair-71k (returned), test split: per category n_pairs pairs of a synthetic scene
    and its affine warp onto a wider canvas (the rotation grows with the viewpoint bin, i % 3), the keypoints moved by
    the same warp (null where they leave the frame); each pair JSON also holds its "warp" [A | b] (pixels)."""
    params = {"n_categories": n_categories, "n_pairs": n_pairs, "image_size": image_size, "n_kps": n_kps, "seed": seed}
    return write_synthetic_set(root, "SPair-71k", params, force, lambda top: _write_spair(top, **params))

def _write_spair(top, n_categories, n_pairs, image_size, n_kps, seed):
    S, names = image_size, []
    for c, category in enumerate(SPAIR_CATEGORIES[:n_categories]):
        for i in range(n_pairs):
            g = torch.Generator().manual_seed(seed * 1_000_003 + c * 1000 + i)
            img, angle = render_scene(S, g)[0], math.radians((5 + 12 * (i % 3)) * _uniform(g, -1, 1))
            A = _uniform(g, 0.8, 1.2) * torch.tensor([[math.cos(angle), -math.sin(angle)],
                                                      [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
            # the scene centre lands near the canvas centre
            b = torch.tensor([S * 5 / 8, S / 2], dtype=torch.float64) - A.sum(1) * S / 2 + _uniform(g, -S / 10, S / 10)
            src_kps = (torch.rand(n_kps, 2, generator=g, dtype=torch.float64) * 0.7 + 0.15) * S  # (K, 2) xy
            trg_kps = src_kps @ A.T + b
            inside = ((trg_kps >= 0) & (trg_kps < torch.tensor([S * 5 / 4, S]))).all(1)
            src, trg, pair = f"{i:04d}a", f"{i:04d}b", f"{len(names):06d}-{i:04d}a-{i:04d}b:{category}"
            for name, im, kps, keep in ((src, img, src_kps, torch.ones_like(inside)),
                                        (trg, affine_warp(img, A, b, (S, S * 5 // 4)), trg_kps, inside)):
                kps = {str(k): [int(x), int(y)] if ok else None
                       for k, ((x, y), ok) in enumerate(zip(kps.tolist(), keep))}
                _write(top / "ImageAnnotation" / category / f"{name}.json", {"filename": f"{name}.jpg", "kps": kps})
                _write(top / "JPEGImages" / category / f"{name}.jpg", bytes(encode_jpeg(im, quality=95).numpy()))
            _write(top / "PairAnnotation" / "test" / f"{pair}.json", {
                "filename": pair, "src_imname": f"{src}.jpg", "trg_imname": f"{trg}.jpg", "category": category,
                "src_imsize": [S, S, 3], "trg_imsize": [S * 5 // 4, S, 3], "src_bndbox": [0, 0, S - 1, S - 1],
                "trg_bndbox": trg_kps[inside].amin(0).int().tolist() + trg_kps[inside].amax(0).int().tolist(),
                "kps_ids": inside.nonzero().flatten().tolist(), "viewpoint_variation": i % 3,
                "warp": torch.cat([A, b[:, None]], 1).tolist()})
            names.append(pair)
    _write(top / "Layout" / "large" / "test.txt", "".join(f"{n}\n" for n in names).encode())

def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
