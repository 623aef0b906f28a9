"""Where dataset files are looked for: root=, else $BIDST_DATA/<name>, system folders, ~/.cache/bidst/<name>."""

from __future__ import annotations

import http.client
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..errors import BidstError

DOWNLOAD_TIMEOUT_S = 15  # per connection attempt: a blocked network should fail fast, not hang a run
SYSTEM_DIRS = {  # where distribution packages install datasets (Debian: dataset-fashion-mnist)
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
}


def cache_dir(name: str) -> Path:
    """~/.cache/bidst/<name> (honouring $XDG_CACHE_HOME), where downloads go."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bidst" / name


def candidates(name: str, root: str | None) -> list[Path]:
    """The folders to look in, in order; an explicit root is the only candidate."""
    if root is not None:
        return [Path(root).expanduser()]
    env = os.environ.get("BIDST_DATA")
    found = [Path(env).expanduser() / name] if env else []
    return found + [Path(p) for p in SYSTEM_DIRS.get(name, [])] + [cache_dir(name)]


def download(url: str, dest: Path, check: Callable[[Path], None]) -> None:
    """Fetch `url` into `dest` through a temporary file of the same suffix, which `check` must pass (raising
    BidstError if not: an error page from a proxy, a cut-off file), so that a failed download leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".partial-{dest.name}")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        try:
            check(tmp)
        except BidstError as e:
            problem = str(e).replace(f"{tmp}: ", "")
            raise BidstError(f"{url} gave something else than the expected file ({problem}); it was not kept") from None
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def locate(
    name: str,
    root: str | None,
    files: list[str],
    has: Callable[[Path, str], bool],
    how_to: str,
    fetch: Callable[[Path], None] | None = None,
) -> Path:
    """The first candidate that `has` all `files`, else (no explicit root) `fetch` into the cache, else BidstError
    (whose `how_to` ends where the error names both ways to pass a folder). A candidate holding some of the files
    is an error naming the others (not passed over for the next), but for a download cut short in the cache."""
    how_to += " (recipe key data_root, or root= in Python)"
    folders = candidates(name, root)
    for folder in folders:
        lacking = [f for f in files if not has(folder, f)]
        if not lacking:
            return folder
        if len(lacking) < len(files) and not (fetch is not None and root is None and folder == cache_dir(name)):
            raise BidstError(f"{name}: {folder} holds only part of the data: {', '.join(lacking)} missing; {how_to}")
    tried = ", ".join(str(f) for f in folders)
    if fetch is not None and root is None:
        target = cache_dir(name)
        try:
            fetch(target)
        # URLError, timeouts, disk errors; cut-off responses; a file that is not the expected one (BidstError)
        except (OSError, http.client.HTTPException, BidstError) as e:
            raise BidstError(f"{name}: no data in {tried} and downloading it failed ({e}); {how_to}") from None
        return target
    raise BidstError(f"{name}: no data in {tried}; {how_to}")
