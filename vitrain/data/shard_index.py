"""Which shards a ``data.shards`` spec names, how many samples each holds and which classes they share: the
index that :func:`vitrain.data.shards.open_shards` builds a :class:`~vitrain.data.shards.ShardStream` on.

The counts come from the ``manifest.json`` beside the shards (``scripts/make_shards.py`` writes it), from
counting local shards once, or, for streams without a manifest, from ``data.epoch_size``; the class names from
``classes.txt``, ``classes.json`` or the manifest."""

from __future__ import annotations

import glob
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitrain.data.remote import read_text, scheme, shard_name, sibling
from vitrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def expand_shards(spec: str) -> list[str]:
    """The shard URLs of ``data.shards``: brace patterns expanded (``a-{000..009}.tar``), ``::`` separating
    several; local paths made absolute; a scheme that cannot be read is refused
    (:func:`~vitrain.data.remote.scheme`)."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(spec)
    if not urls:
        raise DataError(f"data.shards='{spec}' names no shard; give a path, a brace pattern or a URL")
    for url in urls:
        scheme(url)
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not Path(u).expanduser().is_file()]
    globs = [u for u in missing if re.search(r"[*?[]", u)]
    if globs:
        raise DataError(_glob_message(globs[0]))
    if missing:
        raise DataError(f"shard {missing[0]} does not exist ({len(missing)} of {len(urls)} missing); check data.shards")
    return [str(Path(u).expanduser().resolve()) if _is_local(u) else u for u in urls]


def _is_local(url: str) -> bool:
    return scheme(url) == "file"


def _glob_message(pattern: str) -> str:
    """Why a glob names no shard, and the brace pattern to write instead; the files it matches here are
    shown as one, never read (a glob's matches would change with the folder's contents)."""
    matches = sorted(glob.glob(str(Path(pattern).expanduser())))
    braces = _brace_pattern(matches) if matches else None
    if braces:
        example = f"'{braces}' for the {len(matches)} files it matches here"
    else:
        found = f" (it matches {len(matches)} files here)" if matches else ""
        example = f"e.g. '{Path(pattern).parent}/train-{{000000..000009}}.tar'{found}"
    return (f"shard pattern '{pattern}' is a glob: globs (*, ?, [...]) are not expanded here; write the shards as a "
            f"brace pattern, {example} (in Hydra's quotes: 'data.shards=\"...\"')")


def _brace_pattern(paths: list[str]) -> str | None:
    """``paths`` as brace patterns (runs of consecutive numbers) joined by ``::``, or None when they are not
    <prefix><number><suffix> with one prefix, suffix and number width, or need more than 4 patterns."""
    names = [re.fullmatch(r"(.*?)(\d+)(\D*)", p) for p in paths]
    if not all(names) or len({(m[1], len(m[2]), m[3]) for m in names}) != 1:
        return None
    prefix, digits, suffix = names[0].groups()
    runs: list[list[int]] = []
    for k in sorted(int(m[2]) for m in names):
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    width = len(digits)
    parts = [f"{prefix}{{{a:0{width}d}..{b:0{width}d}}}{suffix}" if a < b else f"{prefix}{a:0{width}d}{suffix}"
             for a, b in runs]
    return "::".join(parts) if len(parts) <= 4 else None


@dataclass(frozen=True)
class Index:
    """Where the index files are: ``manifest`` (``data.manifest``: a path or URL; None: ``manifest.json`` beside
    the shards), and how remote ones are read (``data.storage_options``, ``data.retry_seconds``)."""

    manifest: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    retry_seconds: float = 120.0

    def read(self, shard: str, name: str) -> str | None:
        """The text of the index file ``name`` beside ``shard`` (``manifest.json``: ``manifest`` when given)."""
        url = self.manifest if name == "manifest.json" and self.manifest else sibling(shard, name)
        text = read_text(url, self.storage_options, self.retry_seconds)
        if text is None and name == "manifest.json" and self.manifest:
            raise DataError(f"data.manifest={self.manifest} cannot be read; check the path or URL")
        return text


def shard_counts(urls: list[str], epoch_size: int | None, skip_corrupt: bool, index: Index | None = None) -> list[int]:
    """The samples in each shard of ``urls``: from the manifest (``data.manifest``, else ``manifest.json`` beside
    them), else ``epoch_size`` spread evenly (a stream), else counted (local shards; see :func:`_count` for a
    truncated one)."""
    index = index or Index()
    manifest = index.read(urls[0], "manifest.json")
    entries = json.loads(manifest).get("shards", []) if manifest else []
    known = {entry["name"]: entry["count"] for entry in entries}
    names = [shard_name(u) for u in urls]
    if all(n in known for n in names):
        return [known[n] for n in names]
    if epoch_size is not None:  # a stream without a manifest: spread the size evenly, approximately
        log.warning("no manifest.json lists these shards: using data.epoch_size=%d spread evenly (each sample is "
                    "seen about once per epoch; a manifest makes it exact)", epoch_size)
        return [epoch_size * (i + 1) // len(urls) - epoch_size * i // len(urls) for i in range(len(urls))]
    if not all(_is_local(u) for u in urls):
        raise ConfigError(f"the shards have no manifest.json beside them ({sibling(urls[0], 'manifest.json')}: "
                          f"scripts/make_shards.py writes one); set data.manifest=PATH_OR_URL, or data.epoch_size=N, "
                          f"the number of training samples")
    log.info("counting the samples of %d shards (no manifest.json beside them)", len(urls))
    return [_count(u, skip_corrupt) for u in urls]


def _count(url: str, skip_corrupt: bool) -> int:
    """The samples of a local shard. One that is truncated or corrupt stops the run, or, with ``skip_corrupt``,
    counts the samples read before the fault (those the stream reads), with a warning."""
    from webdataset.tariterators import tarfile_samples

    count = 0
    try:
        for _ in tarfile_samples([{"url": url}]):
            count += 1
    except Exception as e:
        if not skip_corrupt:
            raise DataError(f"shard {url} is truncated or corrupt ({tar_reason(e)} after {count} samples), found "
                            f"while counting the shards (they have no manifest.json); set data.skip_corrupt=true to "
                            f"use the samples that can be read, or regenerate the shards with scripts/make_shards.py"
                            ) from e
        log.warning("shard %s is truncated or corrupt (%s): only its first %d samples can be read, and are used",
                    url, tar_reason(e), count)
    return count


def tar_reason(error: Exception) -> str:
    """What stopped reading a tar, as ``ReadError: unexpected end of data``. webdataset appends the stream
    object and the URL to the exception's arguments (its str() is then a tuple's repr, objects and all) and
    " @ <stream>" to the message: the message alone is kept."""
    message = str(error.args[0]) if error.args else ""
    message = re.sub(r"\s*@?\s*<[^<>]*>|\s*dict_keys\(.*\)", "", message).strip()
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def shard_classes(url: str, index: Index | None = None) -> list[str]:
    """The class names from ``classes.txt`` (one per line) or ``classes.json`` (a list, or name -> index)
    beside the shards, or the ``classes`` of their manifest."""
    index = index or Index()
    text = index.read(url, "classes.txt")
    if text is not None:
        return [line.strip() for line in text.splitlines() if line.strip()]
    for name, key in (("classes.json", None), ("manifest.json", "classes")):
        text = index.read(url, name)
        if text is not None:
            value = json.loads(text) if key is None else json.loads(text).get(key)
            if isinstance(value, dict):
                return [n for n, _ in sorted(value.items(), key=lambda item: item[1])]
            if value:
                return [str(v) for v in value]
    raise DataError(f"no classes.txt, classes.json or manifest.json beside the shards (looked for "
                    f"{sibling(url, 'classes.txt')}); write the class names there, one per line "
                    f"(scripts/make_shards.py does), or give a manifest with classes: data.manifest=PATH_OR_URL")
