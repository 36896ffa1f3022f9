"""Reading benchmark rows from local files, and fetching the HF dataset repos when online.

Row files: JSON (a list of rows, or {"rows"|"data"|"test": [...]}), JSON Lines, CSV (list-valued
columns such as Video-MME's `options` written as JSON or Python lists), and Parquet (the HF
layout of Video-MME) when `pyarrow` is installed (`pip install pyarrow`, or `mmkv[eval]`).
"""
from __future__ import annotations

import ast
import csv
import glob
import json
import os
import zipfile

from ..errors import InputError

ROW_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")


def read_rows(path: str) -> list[dict]:
    """The rows of one file, as dicts. Raises InputError naming the file on a bad format."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):
                for k in ("rows", "data", "test"):
                    if isinstance(data.get(k), list):
                        data = data[k]
                        break
            if not isinstance(data, list):
                raise InputError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
            return data
        if ext == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError:  # keep the row count right: a malformed row is a per-sample error
                            rows.append({"__malformed__": f"line {i + 1} is not valid JSON"})
            return rows
        if ext == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                return [dict(r) for r in csv.DictReader(f)]
        if ext == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise InputError(f"{path}: reading Parquet needs pyarrow, which is not installed: "
                                 "`pip install pyarrow` (or `pip install mmkv[eval]`), or convert the file to "
                                 "JSON Lines first") from None
            return pq.read_table(path).to_pylist()
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read rows from {path}: {e}") from None
    raise InputError(f"{path}: unsupported row file type {ext!r} (use one of {', '.join(ROW_EXTENSIONS)})")


def as_list(value) -> list | None:
    """A list-valued field: a list, a tuple/array, or a JSON / Python list literal (CSV)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, str):
        v = value.tolist()
        return v if isinstance(v, list) else None
    if isinstance(value, str) and value.strip().startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                v = parse(value)
            except (ValueError, SyntaxError):
                continue
            if isinstance(v, list):
                return v
    return None


def find_row_files(root: str, patterns: list[str]) -> list[str]:
    """The files of the first pattern (relative to `root`) that matches anything."""
    for pat in patterns:
        hits = sorted(p for p in glob.glob(os.path.join(root, pat), recursive=True) if os.path.isfile(p))
        if hits:
            return hits
    raise InputError(f"no question file found in {root!r} (looked for {', '.join(patterns)})")


def is_hub_id(spec: str) -> bool:
    """'org/name' that is not an existing local path."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(spec) and not spec.startswith((".", "~"))


def fetch_hub_dataset(repo_id: str, *, revision: str | None = None, cache_dir: str | None = None) -> str:
    """Download a dataset repo with huggingface_hub and unzip its archives next to it (as
    lmms-eval does into $HF_HOME/<cache_dir>). Returns the local folder. Needs network access
    (and an HF token with access for gated sets: `huggingface-cli login`)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError("reading a dataset from the HF Hub needs huggingface_hub (`pip install huggingface_hub`)")\
            from None
    from ..models.loading import CACHE_DIR

    try:
        snap = snapshot_download(repo_id=repo_id, repo_type="dataset", revision=revision)
    except Exception as e:  # noqa: BLE001 - offline, gated, unknown repo: one clear message
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot download the dataset {repo_id!r} from the HF Hub ({type(e).__name__}: {msg}). "
                         "Without network access, download it elsewhere and pass its local folder instead") from None
    out = os.path.join(cache_dir or os.path.join(CACHE_DIR, "datasets"), repo_id.replace("/", "__"))
    os.makedirs(out, exist_ok=True)
    for z in sorted(glob.glob(os.path.join(snap, "**", "*.zip"), recursive=True)):
        stamp = os.path.join(out, ".unzipped_" + os.path.relpath(z, snap).replace(os.sep, "__"))
        if os.path.exists(stamp):
            continue
        with zipfile.ZipFile(z) as zf:
            zf.extractall(out)
        open(stamp, "w").close()
    for entry in os.listdir(snap):  # row files and folders of the snapshot, visible from `out`
        dst = os.path.join(out, entry)
        if not os.path.exists(dst) and not entry.endswith(".zip"):
            os.symlink(os.path.join(snap, entry), dst)
    return out
