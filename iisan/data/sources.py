"""Where the paper's data sets come from, as data: the TSVs in the authors' repository at a pinned
commit (with the size, sha256 and git blob id of each file, read from that commit's tree), the image
archives on Google Drive (the links in the authors' README), and the statistics each data set must
have after the paper's protocol (the authors' code, ``data_utils/preprocess.py::read_behaviors``).

Paths are relative to the repository root; the registry of data sets (``datasets.DATASETS``) takes each
fetched data set's folder and file names from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .download import Expected

AUTHORS_REPO = "GAIR-Lab/IISAN"
AUTHORS_COMMIT = "67f5c1faf12a1f9fc3258922bb05684561532d1d"
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
DRIVE_VIEW = "https://drive.google.com/file/d/{id}/view"


@dataclass(frozen=True)
class RepoFile:
    path: str  # in the authors' repository and in ours
    expected: Expected
    url_template: str = RAW_URL  # another server (a mirror, a test's) may serve the same paths

    def url(self) -> str:
        return self.url_template.format(repo=AUTHORS_REPO, commit=AUTHORS_COMMIT, path=self.path)


@dataclass(frozen=True)
class DriveArchive:
    name: str  # the zip's file name
    drive_id: str
    folder: str  # the folder of <item_id>.jpg it unpacks to, under Dataset/

    def url(self) -> str:
        return DRIVE_VIEW.format(id=self.drive_id)


class Stats(NamedTuple):
    """A data set's size after the paper's protocol."""

    users: int
    items: int
    interactions: int


@dataclass(frozen=True)
class DataSource:
    folder: str  # Dataset/<folder>
    users: RepoFile
    items: RepoFile
    images: DriveArchive
    stats: Stats  # after the paper's protocol (a plain (users, items, interactions) tuple also does)


SOURCES = {
    "Scientific": DataSource(
        folder="Scientific",
        users=RepoFile("Dataset/Scientific/am_Industrial_and_Scientific_users.tsv", Expected(
            1115425, "1cc801daba6bb7af4e1f2ed4506231d489b1445e58f8ea3e1d399ac9e14846b2",
            "4edf1f7dd210017f8b04cee5ca089ea7a0b6f05a")),
        items=RepoFile("Dataset/Scientific/Industrial_and_Scientific_items.tsv", Expected(
            2199888, "96cecc1b60b3f8a858b3b07c98dc577a32ff4d1fa32e7bc4b466a9e95b84f8aa",
            "46e1a659ae64ca97211edd4bba8b2b9c13336435")),
        images=DriveArchive("am_image_is.zip", "1vXLls-2DvvkMfgiCv3nB8C29nu0NDdt3", "am_image_is"),
        stats=Stats(12_076, 20_314, 81_711),
    ),
    "Instrument": DataSource(
        folder="Instrument",
        users=RepoFile("Dataset/Instrument/am_Musical_Instruments_users_10K.tsv", Expected(
            1069462, "d6c2d2a4e7108423c14014820abf47f90969b8655e9655b2963c793ad3f24e4b",
            "02958614b874cae2dc488782a59f472f1db07327")),
        items=RepoFile("Dataset/Instrument/Musical_Instruments_items.tsv", Expected(
            2849271, "bd91547b58df5434de782336c54ffa80f8a83ce59f2811287dcfba555016645f",
            "c4b0b63e706fba4c5b9d4719b7e32e2b3d00a348")),
        images=DriveArchive("am_image_mi.zip", "1icKbl3ltN28WDESSKOdhOA0pNWIiNxe0", "am_image_mi"),
        stats=Stats(10_000, 19_246, 75_022),
    ),
    "Office": DataSource(
        folder="Office",
        users=RepoFile("Dataset/Office/am_Office_Products_users_10K.tsv", Expected(
            1002503, "f4110e9783e7de772711777eda4f375bb5d37419a65012d15149f013633989a4",
            "e2014c1532d48a8f12afc30b748bdda10034c5b2")),
        # Only its git blob id is known here (the file was too large for the copy this table was read
        # from); size and sha256 are recorded in the manifest when it is first fetched.
        items=RepoFile("Dataset/Office/Office_Products_items.tsv", Expected(
            git_blob="08dbc46f1de7c9cd82d52deefbbfc965ab29879d")),
        images=DriveArchive("am_image_op.zip", "1zl-RbSNwUmQicCB3w1xY9RQWN8vGg5pC", "am_image_op"),
        stats=Stats(10_000, 22_785, 71_276),
    ),
}
