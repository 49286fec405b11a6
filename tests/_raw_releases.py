"""Miniature official raw releases of MIR-Flickr25K, NUS-WIDE and MS-COCO 2014, in their real
layouts (folder and file names, line formats, JSON schema), scaled down. Each builder returns the
truth it wrote (labels, tags, captions per item) so that tests can compute the expected arrays
with plain loops, and follows simple rules so that the counts after each filtering step can be
computed by hand (see each builder's docstring).

Layout facts and their sources (cited in docs/data.md):
- MIR-Flickr25K (mirflickr25k.zip, mirflickr25k_annotations_v080.zip): ``mirflickr/im<N>.jpg``,
  ``mirflickr/meta/tags/tags<N>.txt`` (one processed tag per line), ``mirflickr/doc/common_tags.txt``
  (``<tag> <count>`` per line), ``mirflickr25k_annotations_v080/<concept>.txt`` (image numbers one
  per line; 24 concepts, 14 ``_r1`` subsets, README.txt).
- NUS-WIDE: ``ImageList/Imagelist.txt`` (Windows paths ``C:\\ImageData\\Flickr\\<folder>\\<file>.jpg``),
  ``Groundtruth/AllLabels/Labels_<concept>.txt`` (one 0/1 per line, 81 concepts),
  ``NUS_WID_Tags/TagList1k.txt`` (1,000 tags), ``NUS_WID_Tags/AllTags1k.txt`` (one line of 1,000
  tab-separated 0/1 per image), images under ``Flickr/<folder>/``. The release was made on
  Windows: its text files are written here with CRLF line ends (not documented; the parser
  accepts both).
- COCO 2014: ``annotations/instances_{train,val}2014.json`` and ``captions_{train,val}2014.json``
  in COCO's annotation format (https://cocodataset.org/#format-data), images
  ``{train,val}2014/COCO_{train,val}2014_<12-digit id>.jpg``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MIR_CONCEPTS = ("animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor", "lake", "male",
                "night", "people", "plant_life", "portrait", "river", "sea", "sky", "structures", "sunset", "transport",
                "tree", "water")
MIR_R1 = ("baby", "bird", "car", "clouds", "dog", "female", "flower", "male", "night", "people", "portrait", "river",
          "sea", "tree")
NUS_CONCEPTS = (
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings", "cars", "castle", "cat",
    "cityscape", "clouds", "computer", "coral", "cow", "dancing", "dog", "earthquake", "elk", "fire", "fish", "flags",
    "flowers", "food", "fox", "frost", "garden", "glacier", "grass", "harbor", "horses", "house", "lake", "leaf", "map",
    "military", "moon", "mountain", "nighttime", "ocean", "person", "plane", "plants", "police", "protest", "railroad",
    "rainbow", "reflection", "road", "rocks", "running", "sand", "sign", "sky", "snow", "soccer", "sports", "statue",
    "street", "sun", "sunset", "surf", "swimmers", "tattoo", "temple", "tiger", "tower", "town", "toy", "train", "tree",
    "valley", "vehicle", "water", "waterfall", "wedding", "whales", "window", "zebra")
# the 21 most frequent NUS-WIDE concepts of the literature; the fixture makes them the most frequent too
NUS_TOP21 = ("animal", "beach", "buildings", "clouds", "flowers", "grass", "lake", "mountain", "ocean", "person",
             "plants", "reflection", "road", "rocks", "sky", "snow", "sunset", "tree", "vehicle", "water", "window")
COCO_CATEGORIES = [
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"), (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"), (15, "bench", "outdoor"), (16, "bird", "animal"), (17, "cat", "animal"),
    (18, "dog", "animal"), (19, "horse", "animal"), (20, "sheep", "animal"), (21, "cow", "animal"),
    (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"), (25, "giraffe", "animal"),
    (27, "backpack", "accessory"), (28, "umbrella", "accessory"), (31, "handbag", "accessory"), (32, "tie", "accessory"),
    (33, "suitcase", "accessory"), (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"), (40, "baseball glove", "sports"),
    (41, "skateboard", "sports"), (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"), (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"),
    (54, "sandwich", "food"), (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"), (62, "chair", "furniture"),
    (63, "couch", "furniture"), (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"), (73, "laptop", "electronic"),
    (74, "mouse", "electronic"), (75, "remote", "electronic"), (76, "keyboard", "electronic"),
    (77, "cell phone", "electronic"), (78, "microwave", "appliance"), (79, "oven", "appliance"),
    (80, "toaster", "appliance"), (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
    (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"), (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"), (90, "toothbrush", "indoor")]


def write_jpeg(path: Path, rng: np.random.Generator, size=(40, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    base = rng.integers(0, 256, 3)
    grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 256, 3)[None, None, :]
    noise = rng.integers(0, 40, (h, w, 3))
    Image.fromarray(np.clip(base * 0.5 + grad * 0.5 + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_mirflickr(root: Path, rng: np.random.Generator, n_images: int = 30, min_tag_count: int = 3,
                   image_size: tuple[int, int] = (40, 30)) -> dict:
    """MIR-Flickr25K in ``root`` with ``n_images`` images. Rules (for hand counts, n = 30):
    image N has no label iff N % 6 == 0 (5 dropped, 25 left); of the labelled, image N has no
    vocabulary tag iff N % 5 == 0 (5, 10, 15, 20, 25: 5 dropped, 20 left). Every image with
    text has the tag "sky", those with N % 3 == 0 "café" and N % 4 == 0 "água" (UTF-8; both
    used >= 3 times for n = 30); images without text have no tag or only tags used < min_tag_count
    times. Images are ``image_size`` (width, height) JPEGs."""
    base, ann = root / "mirflickr", root / "mirflickr25k_annotations_v080"
    (base / "meta" / "tags").mkdir(parents=True)
    (base / "doc").mkdir()
    ann.mkdir()
    frequent = ["cloud", "2008", "nikon", "sunset", "beach", "portrait", "blue"]
    labels: dict[int, list[str]] = {}
    tags: dict[int, list[str]] = {}
    for n in range(1, n_images + 1):
        labels[n] = [] if n % 6 == 0 else sorted(rng.choice(MIR_CONCEPTS, size=rng.integers(1, 4), replace=False).tolist())
        if n % 5 == 0 and n % 6 != 0:
            tags[n] = [] if n % 10 == 0 else [f"rare{n}"]
        else:
            tags[n] = (["sky"] + ["café"] * (n % 3 == 0) + ["água"] * (n % 4 == 0)
                       + rng.choice(frequent, size=rng.integers(0, 4), replace=False).tolist())
        write_jpeg(base / f"im{n}.jpg", rng, image_size)
        (base / "meta" / "tags" / f"tags{n}.txt").write_bytes("".join(t + "\n" for t in tags[n]).encode())
    counts: dict[str, int] = {}
    for ts in tags.values():
        for t in ts:
            counts[t] = counts.get(t, 0) + 1
    order = sorted(counts, key=lambda t: (-counts[t], t))
    (base / "doc" / "common_tags.txt").write_bytes("".join(f"{t} {counts[t]}\n" for t in order).encode())
    for c in MIR_CONCEPTS:
        members = [n for n in range(1, n_images + 1) if c in labels[n]]
        (ann / f"{c}.txt").write_text("".join(f"{n}\n" for n in members))
        if c in MIR_R1:  # "relevant" subsets: images where the concept is salient
            (ann / f"{c}_r1.txt").write_text("".join(f"{n}\n" for n in members if rng.random() < 0.5))
    (ann / "README.txt").write_text("MIRFLICKR-25000 annotations (miniature fixture)\n")
    vocabulary = [t for t in order if counts[t] >= min_tag_count]
    return {"labels": labels, "tags": tags, "vocabulary": vocabulary, "n_images": n_images,
            "min_tag_count": min_tag_count}


def make_nuswide(root: Path, rng: np.random.Generator, n_images: int = 40, n_tags: int = 1000) -> dict:
    """NUS-WIDE in ``root``. Rules (n = 40): image i (1-based) with i % 4 == 0 has none of the 21
    top concepts (10 dropped, 30 left): it gets one of the other concepts, each used once; the
    other images get 2 or 3 top concepts (each top concept ends with >= 2 positives, the others
    <= 1). Images with i % 7 == 0 have no tag: 7, 14, 21, 28, 35, of which 7, 14, 21 and 35 are
    kept (require_text=True: 26 left)."""
    (root / "ImageList").mkdir(parents=True)
    truth_dir = root / "Groundtruth" / "AllLabels"
    truth_dir.mkdir(parents=True)
    (root / "NUS_WID_Tags").mkdir()
    others = [c for c in NUS_CONCEPTS if c not in NUS_TOP21]
    folders = ["actor", "airport", "albatross", "animal", "beach"]
    labels, files, tag_sets = {}, {}, {}
    for i in range(1, n_images + 1):
        if i % 4 == 0:
            labels[i] = [others[i // 4]]
        else:
            k = rng.integers(2, 4)
            labels[i] = sorted({NUS_TOP21[(2 * i) % 21], NUS_TOP21[(2 * i + 1) % 21]}
                               | set(rng.choice(NUS_TOP21, size=k - 2, replace=False).tolist()))
        folder = folders[i % len(folders)]
        files[i] = (folder, f"{i:04d}_{int(rng.integers(10**9, 4 * 10**9))}.jpg")
        write_jpeg(root / "Flickr" / folder / files[i][1], rng)
        tag_sets[i] = [] if i % 7 == 0 else sorted(rng.choice(n_tags, size=rng.integers(1, 6), replace=False).tolist())
    crlf = "\r\n"
    (root / "ImageList" / "Imagelist.txt").write_text(
        "".join(f"C:\\ImageData\\Flickr\\{f}\\{name}{crlf}" for f, name in files.values()), newline="")
    for c in NUS_CONCEPTS:
        (truth_dir / f"Labels_{c}.txt").write_text(
            "".join(f"{int(c in labels[i])}{crlf}" for i in range(1, n_images + 1)), newline="")
    tag_names = [f"tag{j:04d}" for j in range(n_tags)]
    (root / "NUS_WID_Tags" / "TagList1k.txt").write_text("".join(t + crlf for t in tag_names), newline="")
    rows = []
    for i in range(1, n_images + 1):
        row = ["0"] * n_tags
        for j in tag_sets[i]:
            row[j] = "1"
        rows.append("\t".join(row) + crlf)
    (root / "NUS_WID_Tags" / "AllTags1k.txt").write_text("".join(rows), newline="")
    return {"labels": labels, "files": files, "tags": tag_sets, "tag_names": tag_names, "n_images": n_images}


COCO_WORDS = ["a", "man", "woman", "dog", "cat", "sitting", "on", "bench", "riding", "bike", "street", "with", "red",
              "table", "pizza", "two", "people", "near", "the", "water", "grass", "playing", "frisbee", "in"]


def make_coco(root: Path, rng: np.random.Generator, n_train: int = 14, n_val: int = 10) -> dict:
    """COCO 2014 in ``root``: ``n_train`` + ``n_val`` images with shuffled, non-contiguous ids.
    Rules: the k-th image of each subset (0-based, in the files' own order) has no instance
    annotation iff k % 5 == 4 (14 + 10 images: 2 + 2 dropped, 20 left); each caption has 4-9
    words of COCO_WORDS, with capitals and punctuation; 5 captions per image."""
    truth = {"images": [], "labels": {}, "captions": {}}
    (root / "annotations").mkdir(parents=True)
    ann_id = 1000
    for subset, n in (("train2014", n_train), ("val2014", n_val)):
        ids = sorted(rng.choice(np.arange(1, 600000), size=n, replace=False).tolist())
        rng.shuffle(ids)  # the files do not list images in id order
        images, inst, caps = [], [], []
        for k, image_id in enumerate(ids):
            name = f"COCO_{subset}_{image_id:012d}.jpg"
            write_jpeg(root / subset / name, rng, size=(48, 36))
            images.append({"license": 3, "file_name": name, "coco_url": f"http://images.cocodataset.org/{subset}/{name}",
                           "height": 36, "width": 48, "date_captured": "2013-11-14 16:28:13",
                           "flickr_url": f"http://farm4.staticflickr.com/1/{image_id}_x_z.jpg", "id": image_id})
            cats = [] if k % 5 == 4 else [COCO_CATEGORIES[j][0] for j in rng.choice(80, size=rng.integers(1, 4))]
            for cat in cats:  # repeated categories: several instances of one category
                ann_id += 1
                inst.append({"segmentation": [[1.0, 2.0, 10.0, 2.0, 10.0, 8.0]], "area": 42.5, "iscrowd": 0,
                             "image_id": image_id, "bbox": [1.0, 2.0, 9.0, 6.0], "category_id": cat, "id": ann_id})
            texts = []
            for _ in range(5):
                ann_id += 1
                words = rng.choice(COCO_WORDS, size=rng.integers(4, 10)).tolist()
                caption = " ".join(words).capitalize() + rng.choice([".", "", " .", "!"])
                if rng.random() < 0.3:
                    caption = caption.replace(" ", ", ", 1)
                caps.append({"image_id": image_id, "id": ann_id, "caption": caption})
                texts.append(caption)
            truth["images"].append((subset, image_id, name))
            truth["labels"][image_id] = sorted(set(cats))
            truth["captions"][image_id] = texts
        rng.shuffle(caps)
        common = {"info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset.", "url":
                           "http://mscoco.org", "version": "1.0", "year": 2014, "contributor": "Microsoft COCO group",
                           "date_created": "2015-01-27 09:11:52.357475"},
                  "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 3,
                                "name": "Attribution-NonCommercial-NoDerivs License"}]}
        categories = [{"supercategory": s, "id": i, "name": name} for i, name, s in COCO_CATEGORIES]
        (root / "annotations" / f"instances_{subset}.json").write_text(json.dumps(
            {**common, "images": images, "annotations": inst, "categories": categories}))
        (root / "annotations" / f"captions_{subset}.json").write_text(json.dumps(
            {**common, "images": images, "annotations": caps}))
    return truth


# -- image features for tests ------------------------------------------------------------------
def tiny_clip_spec(folder: Path) -> tuple[str, dict]:
    """``("clip:<tiny>@<checkpoint>", model_config)``: a tiny random-init open_clip model saved
    once to ``folder`` so that every run computes the same features."""
    import torch
    from test_pairs import TINY_CLIP, TINY_NAME

    from dmmh.encoders.clip import ClipBackbone

    ckpt = Path(folder) / "tiny_clip.pt"
    if not ckpt.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            torch.save(ClipBackbone(TINY_NAME, model_config=TINY_CLIP).clip.state_dict(), ckpt)
    return f"clip:{TINY_NAME}@{ckpt}", TINY_CLIP
