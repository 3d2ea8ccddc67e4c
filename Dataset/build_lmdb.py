"""Build the image LMDBs (authors' Dataset/build_lmdb.py, without pickle).

Unzip the authors' image archives here (am_image_is/, am_image_mi/, am_image_op/), then run
`python build_lmdb.py` to build `<Dataset>/images.lmdb` for every data set whose images are present,
or `python build_lmdb.py --images DIR --items FILE --out PATH` for any folder of <item_id>.jpg.
Missing or unreadable images are stored as flagged blanks and listed in `<out>.report.tsv`.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # runs from a checkout without installing

from iisan.bounds import PIXELS, check_encoding, path_arg  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, setup_logging, summary  # noqa: E402
from iisan.data.datasets import dataset_paths  # noqa: E402
from iisan.data.image_build import build_image_lmdb  # noqa: E402
from iisan.data.interactions import read_items  # noqa: E402
from iisan.data.sources import SOURCES  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402

IMAGE_FOLDERS = {name: source.images.folder for name, source in SOURCES.items()}  # where the archives unpack


def main(argv=None):
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--images", type=path_arg, help="folder of <item_id>.jpg")
    parser.add_argument("--items", type=path_arg, help="items TSV: store exactly its ids (absent images become blanks)")
    parser.add_argument("--out", type=path_arg, help="LMDB folder to write")
    parser.add_argument("--size", type=int, default=224,
                        help="side of the stored square images, in pixels (default: 224)")
    parser.add_argument("--encoding", default="utf-8", help="text encoding of --items (default: utf-8)")
    parser.add_argument("--pixels", choices=PIXELS, default="displayed",
                        help="displayed: as a viewer shows a picture (EXIF orientation, transparency on white, "
                        "16-bit grey); authors: PIL's convert('RGB') alone, as theirs (default: displayed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an image LMDB that --out already holds (nothing else is ever replaced); "
                        "without it, one built from the same pictures and settings is kept")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    jobs = []
    if args.images:
        if not args.out:
            parser.error("--out is required with --images")
        jobs.append((Path(args.images), args.items, Path(args.out)))
    elif args.items or args.out:
        parser.error("--items and --out go with --images (without it, every data set found in Dataset/ is built)")
    else:
        for name, folder in IMAGE_FOLDERS.items():
            paths = dataset_paths(name)
            if (HERE / folder).is_dir():
                jobs.append((HERE / folder, paths["items"], Path(paths["images"])))
        if not jobs:
            parser.error(f"no image folder in {HERE} ({', '.join(IMAGE_FOLDERS.values())}); unzip the authors' "
                         "archives there (Dataset/README.md), or pass --images DIR --out PATH")

    def build() -> None:
        check_encoding(args.encoding)
        for images, items, out in jobs:
            ids = read_items(items, allow_empty_titles=True, encoding=args.encoding).ids if items else None
            report = build_image_lmdb(images, out, ids, size=args.size, overwrite=args.overwrite, inputs=[items],
                                      pixels=args.pixels)
            kept = ", kept: built from these same pictures and settings" if report.get("kept") else ""
            print(f"{out}: {report['stored']:,} images, {report['blank']:,} missing or unreadable "
                  f"(listed in {report['report']}){kept}")

    entry_point("build_lmdb.py", build)


if __name__ == "__main__":
    main()
