"""``lmckit data``: list datasets, show what was found where, download into the cache.

lmckit data list [--data-dir D] [--json]
lmckit data info NAME [--data-dir D] [--no-checksums] [--json]
lmckit data download NAME [--root DIR] [--mirror URL] [--timeout S] [--force] [--dry-run] [--json]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import LmcError
from .common import add_data, add_json, path_arg, print_json, print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list, inspect and download datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")

    pl = dsub.add_parser("list", help="registered datasets and where each was found")
    add_data(pl)
    add_json(pl)
    pl.set_defaults(func=run_list)

    pi = dsub.add_parser("info", help="files found, split sizes, class counts, checksum status")
    pi.add_argument("name", help="dataset name, e.g. fashion-mnist, mnist, cifar10")
    add_data(pi)
    pi.add_argument("--val-size", type=int, default=0, help="also show a held-out validation split of this size")
    pi.add_argument("--no-checksums", action="store_true", help="skip hashing the files")
    add_json(pi)
    pi.set_defaults(func=run_info)

    pd = dsub.add_parser("download", help="download a dataset into the user cache (checksums verified)")
    pd.add_argument("name")
    pd.add_argument(
        "--root", type=path_arg, default=None, help="folder to hold NAME/ (default: the user cache, which is searched)"
    )
    pd.add_argument(
        "--mirror",
        default=None,
        help="base URL replacing the official one (default: LMCKIT_DATA_MIRROR if set, else the official URL)",
    )
    pd.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)")
    pd.add_argument("--force", action="store_true", help="download again even if verified files are present")
    pd.add_argument("--dry-run", action="store_true", help="print the URLs and checksums, download nothing")
    add_json(pd)
    pd.set_defaults(func=run_download)

    def no_action(_args: argparse.Namespace) -> int:
        raise LmcError(
            "no action given", "run `lmckit data list`, `lmckit data info NAME` or `lmckit data download NAME`"
        )

    p.set_defaults(func=no_action)


def _found(name: str, data_dir: str | None) -> tuple[Path | None, str | None]:
    from ..data import find_dataset

    try:
        return find_dataset(name, data_dir), None
    except LmcError as e:
        return None, e.message


def run_list(args: argparse.Namespace) -> int:
    from ..data import DATASETS

    rows = []
    for name, info in DATASETS.items():
        folder, _ = _found(name, args.data_dir)
        rows.append(
            {
                "name": name,
                "classes": info.num_classes,
                "found": "generated" if info.generated else (str(folder) if folder else "-"),
            }
        )
    if args.json:
        print_json(rows)
    else:
        print_table(rows)
    return 0


def dataset_report(name: str, data_dir: str | None = None, val_size: int = 0, checksums: bool = True) -> dict[str, Any]:
    """What ``lmckit data info`` shows: search path, files and their checksum status, splits, class counts.

    ``ok`` is True when the dataset loads and no file has a checksum mismatch.
    """
    import torch

    from ..data import candidate_dirs, dataset_info, load_dataset
    from ..data.checksums import KNOWN_CHECKSUMS, check_file

    info = dataset_info(name)
    rep: dict[str, Any] = {
        "name": name,
        "num_classes": info.num_classes,
        "mean": list(info.mean),
        "std": list(info.std),
    }
    if info.generated:
        rep.update(folder="<generated>", searched=[], files=[])
    else:
        folder, err = _found(name, data_dir)
        rep["searched"] = [
            {"dir": str(d), "exists": d.is_dir(), "complete": info.is_present(d)}
            for d in candidate_dirs(name, data_dir)
        ]
        rep["folder"] = str(folder) if folder else None
        if folder is None:
            rep.update(ok=False, error=err, hint=info.install_hint, files=[])
            return rep
        known = KNOWN_CHECKSUMS.get(name, {})
        files = []
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            stem = p.name[:-3] if p.name.endswith(".gz") else p.name
            if stem not in info.files and not (stem.endswith(".bin") and stem[:-4] in info.files):
                continue
            if checksums:
                files.append(check_file(p, known.get(stem)))
            else:
                files.append({"file": stem, "path": str(p), "bytes": p.stat().st_size, "status": "not checked"})
        rep["files"] = files
    try:
        ds = load_dataset(name, data_dir, val_size=val_size)
    except LmcError as e:
        rep.update(ok=False, error=e.message, hint=e.hint)
        return rep
    rep["image_shape"] = [ds.in_channels, ds.image_size, ds.image_size]
    rep["splits"] = {
        s: {"size": ds.size(s), "class_counts": torch.bincount(ds.labels[s], minlength=ds.num_classes).tolist()}
        for s in ds.splits()
    }
    rep["ok"] = not any(f.get("status") in ("mismatch", "unreadable") for f in rep["files"])
    return rep


def _bad_files_error(rep: dict[str, Any]) -> None:
    """Turn files that fail their checksum (or cannot be read) into the report's error, as a load failure is."""
    bad = [f for f in rep["files"] if f.get("status") in ("mismatch", "unreadable")]
    if rep.get("error") or not bad:
        return
    names = ", ".join(f"{Path(f['path']).name} ({f['status']})" for f in bad)
    rep["error"] = (
        f"{len(bad)} of the {len(rep['files'])} files of {rep['name']} in {rep['folder']} "
        f"do not match the published dataset: {names}"
    )
    rep["hint"] = f"get the files again (`lmckit data download {rep['name']} --force`) or check where they came from"


def run_info(args: argparse.Namespace) -> int:
    """Print the report (stdout); missing, unloadable or mismatching data is then one error line and exit 2."""
    if args.val_size < 0:
        raise LmcError(f"--val-size must not be negative, got {args.val_size}")
    rep = dataset_report(args.name, args.data_dir, args.val_size, not args.no_checksums)
    _bad_files_error(rep)
    if args.json:
        if rep.get("error"):  # --json's one document on failure carries the exit status too
            rep["exit_code"] = 2
        print_json(rep)
        if rep.get("error"):  # the report is on stdout; the error follows the one convention (stderr, exit 2)
            raise LmcError(rep["error"], rep.get("hint"))
        return 0
    print(f"dataset {rep['name']}: {rep['num_classes']} classes, mean {rep['mean']}, std {rep['std']}")
    if rep["searched"]:
        print("search path:")
        for s in rep["searched"]:
            mark = "complete" if s["complete"] else ("exists, incomplete" if s["exists"] else "absent")
            print(f"  {s['dir']}  ({mark})")
    print(f"folder: {rep['folder'] or 'not found'}")
    if rep["files"]:
        print_table(
            [
                {
                    "file": f["file"],
                    "bytes": f["bytes"],
                    "checksum": f"{f['algo']} ({f['checksum_of']})" if f.get("algo") else "-",
                    "status": f["status"],
                }
                for f in rep["files"]
            ]
        )
    if "splits" in rep:
        print(f"images: {'x'.join(map(str, rep['image_shape']))} uint8")
        print_table(
            [
                {"split": s, "size": v["size"], "class counts": " ".join(map(str, v["class_counts"]))}
                for s, v in rep["splits"].items()
            ]
        )
    for f in rep["files"]:
        if f["status"] == "mismatch":
            print(
                f"warning: {f['path']} does not match the known {f['algo']} checksum; "
                "the file differs from the published dataset"
            )
    if rep.get("error"):
        raise LmcError(rep["error"], rep.get("hint"))
    return 0


def run_download(args: argparse.Namespace) -> int:
    from ..data.download import download_dataset, download_plan, download_target

    download_target(args.name, args.root)  # checked in a dry run too: it lists what the real run would write there
    if args.dry_run:
        plan = download_plan(args.name, args.mirror)
        print_json({"name": args.name, "dry_run": True, "files": plan}) if args.json else print_table(plan)
        return 0
    folder = download_dataset(args.name, args.root, mirror=args.mirror, timeout=args.timeout, force=args.force)
    if args.json:
        print_json({"name": args.name, "folder": str(folder)})
        return 0
    print(f"{args.name}: ready in {folder}")
    return 0
