"""docs/TRAINING.md's "any image folder" example: 3 classes of the CIFAR-10 test split, upscaled to 64x48.

    python docs/three_classes.py ../shared/data/cifar10-jpeg.tar.gz data/three-src

Writes OUT/{train,test}/{cat,dog,horse}/NNNN.png: every fifth image (by number) to test, the rest to
train (800 + 200 per class).
"""
import sys
import tarfile
from pathlib import Path

from PIL import Image

CLASSES = ("cat", "dog", "horse")


def main(tarball: str, out: str) -> None:
    n = 0
    with tarfile.open(tarball) as tar:
        for member in tar:
            p = Path(member.name)
            if member.isfile() and len(p.parts) >= 3 and p.parts[-3] == "test" and p.parts[-2] in CLASSES:
                dst = Path(out, "test" if int(p.stem) % 5 == 0 else "train", p.parts[-2], p.stem + ".png")
                dst.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(tar.extractfile(member)) as im:
                    im.resize((64, 48), Image.BICUBIC).save(dst)
                n += 1
    print(f"wrote {n} images of 64x48 to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
