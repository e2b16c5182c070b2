"""Rebuild tests/data/cifar10-subset.tar.gz from the shared CIFAR-10 JPEG tarball.

    python tests/make_subset.py ../shared/data/cifar10-jpeg.tar.gz

Takes the first N files (sorted by name) of every class: 500 train and 100 test
per class, i.e. 5,000 + 1,000 real CIFAR-10 images. The archive is byte-for-byte
reproducible (sorted members, zeroed owners and times).
"""
import gzip
import io
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

PER_CLASS = {"train": 500, "test": 100}


def main(src: str, out: str = str(Path(__file__).parent / "data" / "cifar10-subset.tar.gz")) -> None:
    members = defaultdict(list)
    with tarfile.open(src) as tar:
        files = {m.name: m for m in tar.getmembers() if m.isfile()}
        for name in sorted(files):
            parts = Path(name).parts[-3:]
            if len(parts) == 3 and parts[0] in PER_CLASS:
                members[parts[0], parts[1]].append(name)
        chosen = sorted(n for (split, _), names in members.items() for n in names[: PER_CLASS[split]])
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as outtar:
            for name in chosen:
                data = tar.extractfile(files[name]).read()
                info = tarfile.TarInfo("/".join(Path(name).parts[-3:]))
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                outtar.addfile(info, io.BytesIO(data))
    with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue())
    print(f"wrote {out}: {len(chosen)} images")


if __name__ == "__main__":
    main(*sys.argv[1:])
