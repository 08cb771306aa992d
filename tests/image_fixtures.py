"""Small generated stand-ins for the image sources `reptile-dist data images` reads.

Every class has its own colour; each of its images is that colour with a little noise, saved in a
mix of sizes (landscape, portrait, square), modes (RGB, grayscale, RGBA, palette) and formats (PNG,
JPEG), so a test can tell classes apart by their pixels after any conversion.
"""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((40, 30), (24, 36), (32, 32), (50, 20))  # (width, height)
KINDS = ("png-rgb", "jpeg-rgb", "png-gray", "png-rgba", "png-palette", "jpeg-gray")

# CIFAR-100's 20 superclasses in coarse-label order, each with its 5 fine classes.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_FINE = sorted(name for names in CIFAR100_SUPERCLASSES.values() for name in names)  # fine labels are alphabetical
CIFAR100_COARSE = list(CIFAR100_SUPERCLASSES)


def class_colour(index: int) -> np.ndarray:
    """A colour per class index, far from the others in at least one channel."""
    rng = np.random.default_rng([7, index])
    return rng.integers(30, 226, size=3)


def picture(rng: np.random.Generator, colour: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(height, width, 3) uint8: `colour` with +-8 noise."""
    width, height = size
    noise = rng.integers(-8, 9, size=(height, width, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def save(pixels: np.ndarray, path: Path, kind: str) -> Path:
    """Write `pixels` (RGB) to `path` without suffix, as `kind`; returns the file written."""
    image = Image.fromarray(pixels)
    if kind.endswith("gray"):
        image = image.convert("L")
    elif kind == "png-rgba":
        image = image.convert("RGBA")
    elif kind == "png-palette":
        image = image.quantize(16)
    path = path.with_suffix(".jpg" if kind.startswith("jpeg") else ".png")
    image.save(path, quality=95) if kind.startswith("jpeg") else image.save(path)
    return path


def write_class_folders(folder: Path, classes: list[str], per_class: int, first_index: int = 0, seed: int = 0) -> None:
    """One folder per class in `folder`, `per_class` images each of mixed size, mode and format."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            k = c + j
            save(picture(rng, class_colour(first_index + c), SIZES[k % len(SIZES)]), folder / name / f"img{j:02d}",
                 KINDS[k % len(KINDS)])


def write_split_folders(root: Path, counts: dict[str, int] | None = None, per_class: int = 3) -> dict[str, list[str]]:
    """root/{train,val,test}/<class>/; returns each split's class names."""
    counts = counts or {"train": 4, "val": 2, "test": 3}
    classes, index = {}, 0
    for split, count in counts.items():
        classes[split] = [f"{split}_class{c}" for c in range(count)]
        write_class_folders(root / split, classes[split], per_class, first_index=index, seed=index)
        index += count
    return classes


def write_flat(root: Path, classes: int = 10, per_class: int = 3) -> list[str]:
    names = [f"class{c:02d}" for c in range(classes)]
    write_class_folders(root, names, per_class)
    return names


def write_mini_imagenet_csv(root: Path, counts: dict[str, int] | None = None, per_class: int = 3) -> dict[str, list[str]]:
    """Ravi & Larochelle's layout: root/images/<wnid><number>.jpg and root/<split>.csv (filename,label)."""
    counts = counts or {"train": 4, "val": 2, "test": 3}
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    classes, index = {}, 0
    for split, count in counts.items():
        classes[split] = [f"n{index + c:08d}" for c in range(count)]
        with open(root / f"{split}.csv", "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["filename", "label"])
            for c, wnid in enumerate(classes[split]):
                for j in range(per_class):
                    file = save(picture(rng, class_colour(index + c), (50, 40)), root / "images" / f"{wnid}{j:08d}", "jpeg-rgb")
                    writer.writerow([file.name, wnid])
        index += count
    return classes


def write_mini_imagenet_pickles(root: Path, counts: dict[str, int] | None = None, per_class: int = 3,
                                size: int = 8) -> dict[str, dict]:
    """mini-imagenet-cache-<split>.pkl: {"image_data": (n, size, size, 3) uint8, "class_dict": name -> rows}."""
    counts = counts or {"train": 4, "val": 2, "test": 3}
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    caches, index = {}, 0
    for split, count in counts.items():
        images = np.stack([picture(rng, class_colour(index + c), (size, size)) for c in range(count) for _ in range(per_class)])
        order = rng.permutation(len(images))  # rows of a class need not be contiguous
        class_dict = {f"n{index + c:08d}": [int(np.flatnonzero(order == c * per_class + j)[0]) for j in range(per_class)]
                      for c in range(count)}
        caches[split] = {"image_data": images[order], "class_dict": class_dict}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as stream:
            pickle.dump(caches[split], stream, protocol=4)
        index += count
    return caches


def write_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1) -> dict[str, dict]:
    """root/cifar-100-python/{train,test,meta} as the python version pickles them (protocol 2)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    coarse_of = {fine: CIFAR100_COARSE.index(coarse) for coarse, names in CIFAR100_SUPERCLASSES.items() for fine in names}
    parts = {}
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = [f for f in range(100) for _ in range(per_class)]
        rng.shuffle(fine)
        images = np.stack([picture(rng, class_colour(f), (32, 32)) for f in fine])  # (n, 32, 32, 3)
        data = {
            "batch_label": f"{part} batch",
            "filenames": [f"{CIFAR100_FINE[f]}_s_{i:06d}.png" for i, f in enumerate(fine)],
            "fine_labels": fine,
            "coarse_labels": [coarse_of[CIFAR100_FINE[f]] for f in fine],
            "data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(fine), 3072),
        }
        parts[part] = {"images": images, **data}
        with open(folder / part, "wb") as stream:
            pickle.dump(data, stream, protocol=2)
    with open(folder / "meta", "wb") as stream:
        pickle.dump({"fine_label_names": CIFAR100_FINE, "coarse_label_names": CIFAR100_COARSE}, stream, protocol=2)
    return parts
