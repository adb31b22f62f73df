"""Long-running daemon: subtract every exposure arriving in an inbox from its template, exactly once.

``zogy-stream daemon --config daemon.toml`` watches ``inbox``; each complete
exposure is registered in a SQLite journal (:mod:`zogy_stream.journal`),
matched to a template (:mod:`zogy_stream.templates`), subtracted with
:func:`zogy_stream.pipeline.subtract`, and its outputs land in ``outbox`` as
``<stem>.zogy.fits``, ``<stem>.cands.ecsv`` (and ``<stem>.stamps.fits``).

Pick-up
    A file is taken when it is complete: it arrived by rename (seen by the
    inotify observer of ``watchdog``), or its size and mtime have not changed
    for ``settle_seconds``.  A directory scan every ``poll_interval`` always
    runs as a safety net (and alone when ``watchdog`` is missing).  Hidden and
    temporary names (``.x``, ``x.tmp``, ``x.part``...) and sidecars
    (``NAME.psf.fits``, ``NAME.psf``, ``NAME.var.fits``, ``NAME.weight.fits``,
    ``NAME.err.fits``, ``NAME.mask.fits``) are never exposures; sidecars are passed to the
    subtraction automatically, for the exposure and for its template.

Crash safety
    A job writes into its own staging directory ``outbox/.zogy-staging/``
    (same filesystem), fsyncs the files, records the planned renames in the
    journal (the *commit plan*), renames each file into place, then marks the
    job done in one transaction.  On start the daemon (holding an exclusive
    lock on ``STATE.lock``) rolls forward every job caught in its commit (all
    its files are staged or final) or back (deletes them), re-queues jobs left
    ``running``, finishes interrupted moves to quarantine or archive, and
    removes the staging directory and other orphan temporary files.  So after
    a crash there is either a complete output set or none.

Failures
    Errors of zogy_stream (:class:`~zogy_stream.errors.ZogyError`: corrupt or
    truncated FITS, no template, all-NaN image, shape mismatch, missing PSF...)
    are permanent: the job is ``failed`` with a one-line reason, the input (and
    its sidecars) moves to ``quarantine`` with ``<name>.reason.txt`` beside it.
    Other errors (``OSError`` such as a full disk, ``MemoryError``...) are
    retried with exponential back-off up to ``max_attempts`` times.  A job
    under which the daemon died ``max_crashes`` times is failed as well.

Stopping
    SIGTERM or SIGINT: no new job is started; running jobs may finish during
    half of ``shutdown_timeout``, then they are cancelled between tiles and
    re-queued; the process exits 0 within ``shutdown_timeout``.  A second
    signal cancels at once.

Scale-out
    ``dask = "tcp://scheduler:8786"`` or ``dask = "local:N"`` runs one job per
    task on a dask.distributed cluster (paths must be on a filesystem shared by
    the workers); the journal, the commits and the moves stay in the daemon.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import errno
import fcntl
import functools
import hashlib
import http.server
import json
import logging
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from .errors import Cancelled, ConfigError, InputError, ProcessingError, ZogyError
from .journal import STATES, Job, Journal
from .templates import (Sidecars, TemplateLibrary, find_sidecars, image_stem, read_image_header,
                        select_image_hdu)

__all__ = ["DaemonConfig", "Daemon", "JobRunner", "ArrivalTracker", "Metrics", "JsonFormatter",
           "make_config", "config_from_args", "add_commands", "main", "file_checksum"]

log = logging.getLogger(__name__)

STAGING = ".zogy-staging"
TMP_PREFIX = ".zogy-tmp-"
SubtractFn = Callable[..., Any]

# Subtraction arguments the daemon sets itself (per exposure, from sidecars and the outbox).
_MANAGED = frozenset({"new", "ref", "out", "new_psf", "ref_psf", "new_var", "ref_var", "new_mask", "ref_mask",
                      "new_weight", "ref_weight", "new_err", "ref_err",
                      "catalog", "stamps", "progress", "quiet", "stop", "dask", "output", "o"})

# (key, kind, help): every key is a TOML key and a --flag.  Kinds ending in "?" accept none.
_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("inbox", "dir", "watched directory of incoming exposures (required)"),
    ("templates", "dir", "template library directory (required)"),
    ("outbox", "path", "directory of the outputs (required)"),
    ("quarantine", "path", "directory of failed inputs and their .reason.txt (required)"),
    ("state", "path", "SQLite job journal (required)"),
    ("archive", "path?", "move inputs there once done (default: leave them)"),
    ("workers", "int", "jobs run at the same time (default 1; with --dask: the cluster's threads)"),
    ("poll_interval", "float", "seconds between two scans of the inbox (default 2)"),
    ("settle_seconds", "float", "a file not renamed in is complete once unchanged this long (default 5)"),
    ("max_attempts", "int", "attempts for transient errors such as a full disk (default 3)"),
    ("max_crashes", "int", "a job under which the daemon died this often fails (default 5)"),
    ("retry_delay", "float", "seconds before the first retry, doubled each time (default 10)"),
    ("shutdown_timeout", "float", "seconds to stop after SIGTERM/SIGINT (default 30)"),
    ("template_keys", "list", "header keywords matching exposure and template (default FILTER,FIELD)"),
    ("min_overlap", "float", "smallest WCS overlap fraction for a footprint match (default 0)"),
    ("hdu", "str?", "HDU of the exposures (default: first 2-D image)"),
    ("template_hdu", "str?", "HDU of the templates (default: first 2-D image)"),
    ("catalog", "bool", "write <stem>.cands.ecsv (default true)"),
    ("stamps", "bool", "write <stem>.stamps.fits (default false)"),
    ("watch", "bool", "use inotify through watchdog when available (default true)"),
    ("log_json", "bool", "log one JSON object per line"),
    ("log_level", "str", "DEBUG, INFO, WARNING or ERROR (default INFO)"),
    ("metrics_port", "int?", "serve Prometheus metrics on 127.0.0.1:PORT"),
    ("dask", "str?", "run jobs on a dask.distributed scheduler ADDRESS, or on local:N workers"),
)
_REQUIRED = ("inbox", "templates", "outbox", "quarantine", "state")


# ============================================================================ configuration
@dataclass(frozen=True)
class DaemonConfig:
    """Settings of the daemon, normalised and validated once (see :func:`make_config`).

    Attributes
    ----------
    inbox, templates, outbox, quarantine, state : Path
        Absolute paths: watched directory, template library, outputs, failed
        inputs, and the SQLite journal.
    archive : Path or None
        Where done inputs are moved (None: they stay in the inbox).
    workers : int
        Jobs at the same time (threads; with ``dask``, the cluster's threads).
    poll_interval, settle_seconds : float
        Scan period and the stability time of a file not renamed in.
    max_attempts, max_crashes : int
        Bounds on transient-error attempts and on crashes under one job.
    retry_delay, shutdown_timeout : float
        First retry back-off (doubled each time) and the stop deadline, seconds.
    template_keys : tuple of str
        Keywords matching exposure and template.
    min_overlap : float
        Smallest footprint overlap fraction for a WCS match.
    hdu, template_hdu : str or None
        HDU of exposures and templates.
    catalog, stamps : bool
        Which outputs to write besides ``<stem>.zogy.fits``.
    watch : bool
        Use the inotify observer when ``watchdog`` is importable.
    log_json : bool
        JSON log lines.
    log_level : str
        Logging level name.
    metrics_port : int or None
        Port of the Prometheus endpoint on 127.0.0.1 (0: any free port).
    dask : str or None
        Scheduler address or ``local:N``.
    subtract_options : tuple of (str, object)
        Keyword arguments of :func:`zogy_stream.pipeline.subtract` (tile, threads, threshold...).
    """

    inbox: Path
    templates: Path
    outbox: Path
    quarantine: Path
    state: Path
    archive: Path | None = None
    workers: int = 1
    poll_interval: float = 2.0
    settle_seconds: float = 5.0
    max_attempts: int = 3
    max_crashes: int = 5
    retry_delay: float = 10.0
    shutdown_timeout: float = 30.0
    template_keys: tuple[str, ...] = ("FILTER", "FIELD")
    min_overlap: float = 0.0
    hdu: str | None = None
    template_hdu: str | None = None
    catalog: bool = True
    stamps: bool = False
    watch: bool = True
    log_json: bool = False
    log_level: str = "INFO"
    metrics_port: int | None = None
    dask: str | None = None
    subtract_options: tuple[tuple[str, Any], ...] = ()

    @property
    def options(self) -> dict[str, Any]:
        """The subtraction keyword arguments as a dict."""
        return dict(self.subtract_options)


def _coerce(name: str, kind: str, value: Any, base: Path) -> Any:
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise ConfigError(f"{name} must be given")
    try:
        if kind in ("dir", "path"):
            path = Path(os.path.expandvars(str(value))).expanduser()
            return (path if path.is_absolute() else base / path).resolve()
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "list":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind}, got {value!r}") from None


def make_config(values: Mapping[str, Any], *, subtract_options: Mapping[str, Any] | None = None,
                base: str | Path | None = None) -> DaemonConfig:
    """Normalise and validate daemon settings into a :class:`DaemonConfig`.

    Parameters
    ----------
    values : mapping
        Daemon keys (see :class:`DaemonConfig`); unknown keys are an error.
    subtract_options : mapping, optional
        Keyword arguments for :func:`zogy_stream.pipeline.subtract`.
    base : str or Path, optional
        Directory of relative paths (default: the current directory).

    Returns
    -------
    DaemonConfig

    Raises
    ------
    ConfigError
        Missing or unknown key, bad value, missing inbox or template directory.
    """
    base = Path.cwd() if base is None else Path(base)
    kinds = {name: kind for name, kind, _ in _FIELDS}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    missing = [k for k in _REQUIRED if values.get(k) in (None, "")]
    if missing:
        raise ConfigError("missing setting(s): " + ", ".join(missing)
                          + " (give them in the TOML file or as --" + " --".join(missing) + ")")
    kw = {k: _coerce(k, kinds[k], v, base) for k, v in values.items()}
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in (subtract_options or {}).items()}
    cfg = DaemonConfig(**kw, subtract_options=tuple(sorted(opts.items())))
    checks = (
        (cfg.workers >= 1, "workers must be >= 1"),
        (cfg.poll_interval > 0, "poll_interval must be > 0"),
        (cfg.settle_seconds >= 0, "settle_seconds must be >= 0"),
        (cfg.max_attempts >= 1, "max_attempts must be >= 1"),
        (cfg.max_crashes >= 1, "max_crashes must be >= 1"),
        (cfg.retry_delay >= 0, "retry_delay must be >= 0"),
        (cfg.shutdown_timeout > 0, "shutdown_timeout must be > 0"),
        (0 <= cfg.min_overlap < 1, "min_overlap must be in [0, 1)"),
        (len(cfg.template_keys) > 0, "template_keys must name at least one keyword"),
        (cfg.metrics_port is None or 0 <= cfg.metrics_port <= 65535, "metrics_port must be in 0..65535"),
        (cfg.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
         f"log_level must be DEBUG, INFO, WARNING or ERROR, got {cfg.log_level!r}"),
        (cfg.inbox.is_dir(), f"inbox {cfg.inbox} is not a directory"),
        (cfg.templates.is_dir(), f"templates {cfg.templates} is not a directory"),
        (cfg.inbox not in (cfg.outbox, cfg.quarantine, cfg.archive, cfg.templates),
         "inbox must differ from outbox, quarantine, archive and templates"),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.dask is not None and cfg.dask.startswith("local:"):
        n = cfg.dask.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"dask must be an address or local:N with N >= 1, got {cfg.dask!r}")
    try:
        from .options import Options
    except ImportError:  # pragma: no cover - the core is part of the package
        return cfg
    names = {f.name for f in dataclasses.fields(Options)}
    Options.from_kwargs(**{k: v for k, v in opts.items() if k in names})  # raises ConfigError
    return cfg


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():  # optional [daemon] and [subtract] tables
        if key in ("daemon", "subtract") and isinstance(value, dict):
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key.replace("-", "_")] = value
    return flat


class _Lenient(argparse.Namespace):
    """Namespace answering None for attributes the subtraction parent does not define."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def config_from_args(args: argparse.Namespace, sub_defaults: Mapping[str, Any] | None = None,
                     subtract_kwargs: Callable[[argparse.Namespace], dict] | None = None) -> DaemonConfig:
    """Build the configuration from parsed ``daemon`` arguments: flags override TOML keys.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments; flags not given are absent (``argparse.SUPPRESS``).
    sub_defaults : mapping, optional
        Defaults of the subtraction options (dest → value) of the subtraction parent parser.
    subtract_kwargs : callable, optional
        Turns a namespace of subtraction options into ``subtract`` keyword
        arguments (default: ``zogy_stream.cli.subtract_kwargs``).

    Returns
    -------
    DaemonConfig
    """
    parent_factory, to_kwargs = _subtraction_hooks()
    if sub_defaults is None:
        sub_defaults = _parser_defaults(parent_factory())
    to_kwargs = subtract_kwargs or to_kwargs
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    toml: dict[str, Any] = {}
    base = Path.cwd()
    if given.get("config"):
        path = Path(given["config"]).expanduser()
        toml, toml_dir = _read_toml(path), path.resolve().parent
        kinds = {n: k for n, k, _ in _FIELDS}
        toml = {k: (_coerce(k, kinds[k], v, toml_dir) if k in kinds and kinds[k].rstrip("?") in ("dir", "path")
                    else v) for k, v in toml.items()}
    daemon_keys = {n for n, _, _ in _FIELDS}
    sub_keys = set(sub_defaults) - _MANAGED - daemon_keys
    managed = sorted((set(toml) & (_MANAGED - daemon_keys))
                     | {k for k in set(sub_defaults) & _MANAGED - daemon_keys
                        if k in given and given[k] != sub_defaults[k]})
    if managed:
        raise ConfigError(f"option(s) {', '.join(managed)} cannot be set for the daemon: per-exposure "
                          "PSF, variance and mask come from sidecar files, outputs go to the outbox")
    unknown = sorted(set(toml) - daemon_keys - sub_keys)
    if unknown:
        raise ConfigError(f"unknown key(s) in {given['config']}: {', '.join(unknown)}; valid keys: "
                          + ", ".join(sorted(daemon_keys | sub_keys)))
    values = {k: v for k, v in toml.items() if k in daemon_keys}
    values.update({k: v for k, v in given.items() if k in daemon_keys})
    sub = dict(sub_defaults)
    sub.update({k: v for k, v in toml.items() if k in sub_keys})
    sub.update({k: v for k, v in given.items() if k in sub_keys})
    kwargs = to_kwargs(_Lenient(**sub))
    return make_config(values, base=base,
                       subtract_options={k: v for k, v in kwargs.items() if k not in _MANAGED})


# ============================================================================ small helpers
def file_checksum(path: str | Path, chunk: int = 1 << 22) -> str:
    """``sha256:<hex>`` of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest`` (replacing it); copy then delete across filesystems."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(TMP_PREFIX + dest.name)
        shutil.copy2(src, tmp)
        _fsync(tmp)
        os.replace(tmp, dest)
        os.unlink(src)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(TMP_PREFIX + path.name)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def one_line(exc: BaseException) -> str:
    """A one-line reason for an exception: ``Type: message`` (at most 500 characters)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def _with_hdu(path: Path, hdu: str | None) -> str:
    return str(path) if hdu is None else f"{path}[{hdu}]"


def check_finite(path: str | Path, hdu: str | None = None, rows: int = 256) -> None:
    """Raise :class:`InputError` if an image has no finite pixel (stops at the first finite block)."""
    with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
        h = select_image_hdu(hdul, hdu)
        if h.header.get("BITPIX", -32) > 0 and "BLANK" not in h.header and not isinstance(h, fits.CompImageHDU):
            return  # integers without BLANK are always finite
        ny = int(h.shape[0])
        for r0 in range(0, ny, rows):
            if np.isfinite(h.section[r0:r0 + rows]).any():
                return
    raise InputError(f"{Path(path).name}: the image has no finite pixel (all NaN/Inf)")


@contextlib.contextmanager
def state_lock(state: Path, wait: float = 2.0) -> Iterator[None]:
    """Hold an exclusive lock on ``STATE.lock`` (one daemon per journal)."""
    path = state.with_name(state.name + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(f"another daemon is using the journal {state}") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def daemon_pid(state: Path) -> int | None:
    """Pid of the daemon holding the journal's lock, or None when no daemon runs."""
    path = state.with_name(state.name + ".lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        text = os.read(fd, 32).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)


# ============================================================================ pick-up
class ArrivalTracker:
    """Decides when a file in the inbox is complete.

    A file is ready when it was renamed into the inbox (:meth:`moved`), or when
    its size and mtime have not changed for ``settle_seconds``: either its mtime
    is already that old when first seen, or two observations that far apart
    agree.

    Parameters
    ----------
    settle_seconds : float
        Stability time.
    clock, wall : callable
        Monotonic and wall clocks (injectable for tests).
    """

    def __init__(self, settle_seconds: float, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.settle = settle_seconds
        self._clock, self._wall = clock, wall
        self._seen: dict[str, tuple[int, int, float]] = {}
        self._moved: set[str] = set()

    def moved(self, path: str) -> None:
        """Note that ``path`` arrived by an atomic rename."""
        self._moved.add(path)

    def ready(self, path: str, st: os.stat_result) -> bool:
        """Whether the file ``path`` with stat ``st`` is complete."""
        key = (st.st_size, st.st_mtime_ns)
        now = self._clock()
        if path in self._moved:
            self._moved.discard(path)
            self._seen[path] = (*key, -float("inf"))
            return True
        prev = self._seen.get(path)
        if prev is not None and prev[:2] == key:
            return now - prev[2] >= self.settle
        self._seen[path] = (*key, now)
        return prev is None and st.st_size > 0 and self._wall() - st.st_mtime >= self.settle

    def prune(self, present: set[str]) -> None:
        """Forget files no longer present."""
        for path in set(self._seen) - present:
            del self._seen[path]
        self._moved &= present


def _start_watcher(directory: Path, on_moved: Callable[[str], None], on_event: Callable[[], None]) -> Any:
    """Start a watchdog observer of ``directory`` (None when watchdog is not importable)."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        log.info("watchdog not available: polling %s only", directory)
        return None
    root = str(directory)

    class Handler(FileSystemEventHandler):
        def on_moved(self, event: Any) -> None:
            dest = os.fsdecode(event.dest_path)
            if not event.is_directory and os.path.dirname(dest) == root:
                on_moved(dest)
            on_event()

        def on_created(self, event: Any) -> None:
            on_event()

        def on_closed(self, event: Any) -> None:
            on_event()

    observer = Observer()
    observer.daemon = True
    observer.schedule(Handler(), root, recursive=False)
    observer.start()
    return observer


# ============================================================================ logs and metrics
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a log record as one JSON object: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(json_lines: bool = False, level: str = "INFO") -> None:
    """Send the logs of zogy_stream (and of other libraries) to stderr, as JSON lines or plain text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, ours = logging.getLogger(), logging.getLogger("zogy_stream")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    ours.handlers[:] = [handler]
    ours.setLevel(level.upper())
    ours.propagate = False
    astropy_log = logging.getLogger("astropy")  # it prints through its own handler otherwise
    astropy_log.handlers[:] = []
    astropy_log.propagate = True
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)  # benign races on stop are logged as errors
    logging.captureWarnings(True)  # other warnings become log records too (one JSON line each)


class Metrics:
    """In-process counters and histograms exposed as Prometheus text."""

    BUCKETS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcomes: dict[str, int] = {}
        self.mpix = 0.0
        self._hist = {name: [[0] * len(self.BUCKETS), 0.0, 0] for name in ("duration", "latency")}

    def observe(self, outcome: str, *, mpix: float = 0.0, duration: float | None = None,
                latency: float | None = None) -> None:
        """Count a finished job attempt (``done``, ``failed``, ``retry``, ``cancelled``...)."""
        with self._lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            self.mpix += mpix
            for name, value in (("duration", duration), ("latency", latency)):
                if value is None:
                    continue
                hist = self._hist[name]
                for i, bound in enumerate(self.BUCKETS):
                    hist[0][i] += value <= bound
                hist[1] += value
                hist[2] += 1

    def render(self, counts: Mapping[str, int], inflight: int = 0) -> str:
        """Prometheus text exposition of the metrics and the journal's ``counts`` per state."""
        p = "zogy_stream"
        lines = [f"# HELP {p}_jobs Jobs in the journal by state.", f"# TYPE {p}_jobs gauge"]
        lines += [f'{p}_jobs{{state="{s}"}} {counts.get(s, 0)}' for s in STATES]
        lines += [f"# HELP {p}_jobs_running_here Jobs running in this daemon.", f"# TYPE {p}_jobs_running_here gauge",
                  f"{p}_jobs_running_here {inflight}"]
        with self._lock:
            lines += [f"# HELP {p}_job_attempts_total Finished job attempts by outcome.",
                      f"# TYPE {p}_job_attempts_total counter"]
            lines += [f'{p}_job_attempts_total{{outcome="{k}"}} {v}' for k, v in sorted(self.outcomes.items())]
            lines += [f"# HELP {p}_mpix_processed_total Megapixels subtracted.",
                      f"# TYPE {p}_mpix_processed_total counter", f"{p}_mpix_processed_total {self.mpix:.6f}"]
            helps = {"duration": "Processing time of done jobs.",
                     "latency": "Time from registration to done of done jobs."}
            for name, (buckets, total, count) in self._hist.items():
                metric = f"{p}_job_{name}_seconds"
                lines += [f"# HELP {metric} {helps[name]}", f"# TYPE {metric} histogram"]
                lines += [f'{metric}_bucket{{le="{b:g}"}} {n}' for b, n in zip(self.BUCKETS, buckets)]
                lines += [f'{metric}_bucket{{le="+Inf"}} {count}', f"{metric}_sum {total:.6f}",
                          f"{metric}_count {count}"]
        return "\n".join(lines) + "\n"


def serve_metrics(port: int, render: Callable[[], str]) -> http.server.ThreadingHTTPServer:
    """Serve ``render()`` as Prometheus text on ``http://127.0.0.1:PORT/metrics`` in a thread."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if self.path.split("?")[0] not in ("/", "/metrics"):
                self.send_error(404)
                return
            body = render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("metrics: " + fmt, *args)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="zogy-metrics", daemon=True).start()
    return server


# ============================================================================ dask
class _DaskStop:
    """``is_set()`` of a dask.distributed Event, asked at most every ``every`` seconds."""

    def __init__(self, name: str, every: float = 0.5) -> None:
        self.name, self.every, self._last, self._set = name, every, 0.0, False

    def is_set(self) -> bool:
        if not self._set and time.monotonic() - self._last >= self.every:
            from distributed import Event
            self._last = time.monotonic()
            self._set = Event(self.name).is_set()
        return self._set


def _remote_subtract(fn: SubtractFn, new: str, ref: str, out: str, kwargs: dict, stop_name: str) -> Any:
    """Task run on a dask worker: one subtraction, cancellable through a distributed Event."""
    return fn(new, ref, out, stop=_DaskStop(stop_name), **kwargs)


class DaskBackend:
    """Runs subtractions as tasks of a dask.distributed cluster.

    Parameters
    ----------
    spec : str
        Scheduler address, or ``local:N`` for a LocalCluster of N one-thread worker processes.
    """

    def __init__(self, spec: str) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise ConfigError("dask needs dask.distributed (pip install 'zogy-stream[dask]')") from exc
        self.cluster = None
        if spec.startswith("local:"):
            self.cluster = LocalCluster(n_workers=int(spec[6:]), threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)
        else:
            self.client = Client(spec, timeout="30s")
        log.info("dask cluster %s: %d worker thread(s)", spec, self.slots)

    @property
    def slots(self) -> int:
        """Worker threads of the cluster."""
        return max(1, sum(self.client.nthreads().values()))

    def run(self, fn: SubtractFn, new: str, ref: str, out: str, kwargs: dict, cancel: threading.Event,
            key: str) -> Any:
        """Run ``fn(new, ref, out, stop=..., **kwargs)`` on the cluster; cancel when ``cancel`` is set."""
        from distributed import Event
        name = f"{key}-{uuid.uuid4().hex[:8]}"
        future = self.client.submit(_remote_subtract, fn, new, ref, out, kwargs, name + "-stop",
                                    key=name, pure=False)
        try:
            while True:
                try:
                    return future.result(timeout=0.25)
                except TimeoutError:
                    if not cancel.is_set():
                        continue
                Event(name + "-stop", client=self.client).set()
                try:
                    return future.result(timeout=5.0)
                except TimeoutError:
                    future.cancel()
                    raise Cancelled("abandoned on shutdown") from None
        finally:
            future.release()

    def close(self, timeout: float = 10.0) -> None:
        """Close the client (and the local cluster)."""
        with contextlib.suppress(Exception):
            self.client.close(timeout=timeout)
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close(timeout=timeout)


# ============================================================================ jobs
def _default_subtract() -> SubtractFn:
    try:
        from .pipeline import subtract
    except ImportError as exc:  # pragma: no cover - the core is part of the package
        raise ConfigError(f"zogy_stream.pipeline is not available: {exc}") from exc
    return subtract


class JobRunner:
    """Runs claimed jobs: match, subtract into staging, commit, or retry / quarantine.

    Parameters
    ----------
    config : DaemonConfig
    journal : Journal
    library : TemplateLibrary
    subtract : callable, optional
        ``subtract(new, ref, out, *, stop, progress, catalog, new_psf, ..., **options)``;
        default :func:`zogy_stream.pipeline.subtract` (tests inject faults here).
    cancel : threading.Event, optional
        Set to abandon running subtractions (between tiles).
    metrics : Metrics, optional
    backend : DaskBackend, optional
        Run the subtraction on a dask cluster instead of in this thread.
    """

    def __init__(self, config: DaemonConfig, journal: Journal, library: TemplateLibrary,
                 subtract: SubtractFn | None = None, *, cancel: threading.Event | None = None,
                 metrics: Metrics | None = None, backend: DaskBackend | None = None) -> None:
        self.config, self.journal, self.library = config, journal, library
        self.subtract = subtract or _default_subtract()
        self.cancel = cancel or threading.Event()
        self.metrics = metrics or Metrics()
        self.backend = backend
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        umask = os.umask(0o022)
        os.umask(umask)
        self.file_mode = 0o666 & ~umask  # outputs get the usual permissions, not mkstemp's 0600

    # -- one job ---------------------------------------------------------------------------
    def staging_dir(self, job: Job) -> Path:
        """Private staging directory of a job attempt, inside the outbox."""
        return self.config.outbox / STAGING / f"job{job.id}-a{job.attempts}"

    def run(self, job: Job) -> str:
        """Run a claimed (``running``) job to its end.

        Returns
        -------
        str
            ``done``, ``retry``, ``failed``, ``cancelled`` or ``changed`` (the
            input changed while processed: re-queued).
        """
        t0 = time.monotonic()
        staging = self.staging_dir(job)
        try:
            return self._process(job, staging, t0)
        except Cancelled:
            self.journal.release(job.id)
            self.metrics.observe("cancelled")
            log.info("job %d (%s) cancelled, back in the queue", job.id, job.name,
                     extra={"job": job.id, "input": job.input, "event": "cancelled"})
            return "cancelled"
        except Exception as exc:  # noqa: BLE001 - no input may stop the daemon
            return self._failed(job, exc)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _side_inputs(self, side: Sidecars, prefix: str) -> dict[str, str]:
        kw = {f"{prefix}_{kind}": str(path) for kind, path in
              (("psf", side.psf), ("mask", side.mask)) if path is not None}
        noise = next(((k, p) for k, p in (("var", side.var), ("weight", side.weight),
                                          ("err", side.err)) if p is not None), None)
        if noise is not None:  # one noise map: variance, else weight, else 1-sigma error
            kw[f"{prefix}_{noise[0]}"] = str(noise[1])
        return kw

    def _call(self, new: str, ref: str, out: str, kwargs: dict, job: Job) -> Any:
        kwargs = dict(kwargs, progress=False)
        if self.backend is None:
            return self.subtract(new, ref, out, stop=self.cancel, **kwargs)
        return self.backend.run(self.subtract, new, ref, out, kwargs, self.cancel,
                                key=f"zogy-job{job.id}-a{job.attempts}")

    def _process(self, job: Job, staging: Path, t0: float) -> str:
        cfg = self.config
        src = Path(job.input)
        if not src.is_file():
            raise InputError(f"{src.name}: the input vanished")
        header, shape = read_image_header(src, cfg.hdu)
        check_finite(src, cfg.hdu)
        match = self.library.match(header, shape)
        self.journal.set_template(job.id, str(match.template.path))
        log.info("job %d: %s -> %s (by %s, overlap %.2f)", job.id, src.name, match.template.path.name,
                 match.method, match.overlap, extra={"job": job.id, "input": job.input,
                                                     "template": str(match.template.path), "event": "start"})
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        stem = image_stem(src.name) or src.stem
        kwargs = cfg.options
        kwargs.update(self._side_inputs(find_sidecars(src), "new"))
        kwargs.update(self._side_inputs(match.template.sidecars, "ref"))
        products = {"zogy": staging / f"{stem}.zogy.fits"}
        if cfg.catalog:
            products["cands"] = kwargs["catalog"] = staging / f"{stem}.cands.ecsv"
        if cfg.stamps:
            products["stamps"] = kwargs["stamps"] = staging / f"{stem}.stamps.fits"
        kwargs.update({k: str(kwargs[k]) for k in ("catalog", "stamps") if k in kwargs})
        self._call(_with_hdu(src, cfg.hdu), _with_hdu(match.template.path, cfg.template_hdu),
                   str(products["zogy"]), kwargs, job)
        plan = []
        for kind, staged in products.items():
            if not staged.is_file():
                if kind == "stamps":
                    log.warning("job %d: no stamps were written", job.id)
                    continue
                raise ProcessingError(f"the subtraction did not write {staged.name}")
            os.chmod(staged, self.file_mode)
            _fsync(staged)
            plan.append((str(staged), str(cfg.outbox / staged.name)))
        _fsync(staging, directory=True)
        mpix = shape[0] * shape[1] / 1e6
        self.journal.begin_commit(job.id, plan, duration=time.monotonic() - t0, mpix=mpix)
        try:
            self._finish(job, plan)
        except BaseException:
            for s, f in plan:  # back out the renames already made, then let the error decide
                if not os.path.exists(s):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f)
            raise
        return "done"

    def _finish(self, job: Job, plan: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> None:
        """Rename staged files into place and mark the job done (the commit)."""
        for staged, final in plan:
            if os.path.exists(staged):
                os.replace(staged, final)
        _fsync(self.config.outbox, directory=True)
        dest = self.config.archive / job.name if self.config.archive else None
        if not self.journal.finish_commit(job.id, moved_to=None if dest is None else str(dest)):
            raise ProcessingError(f"job {job.id} is no longer running in the journal")
        done = self.journal.get(job.id)
        if dest is not None:
            self.move_input(job.input, dest)
        self.metrics.observe("done", mpix=done.mpix or 0.0, duration=done.duration,
                             latency=(done.finished or time.time()) - done.created)
        log.info("job %d done: %s in %.2f s", job.id, job.name, done.duration or 0.0,
                 extra={"job": job.id, "input": job.input, "event": "done", "outputs": list(done.outputs),
                        "duration": done.duration})

    def _failed(self, job: Job, exc: Exception) -> str:
        cfg = self.config
        permanent = isinstance(exc, ZogyError)
        reason = one_line(exc)
        extra = {"job": job.id, "input": job.input, "error": reason}
        try:
            st = os.stat(job.input)
        except OSError:
            st = None
        if st is None:
            self.journal.mark_failed(job.id, f"the input vanished ({reason})")
            self.metrics.observe("failed")
            log.error("job %d failed: %s vanished", job.id, job.name, extra=extra | {"event": "failed"})
            return "failed"
        if (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns):
            self.journal.release(job.id, delay=cfg.settle_seconds)
            log.warning("job %d: %s changed while processed, re-queued", job.id, job.name, extra=extra)
            return "changed"
        if not permanent and job.attempts < cfg.max_attempts:
            delay = min(cfg.retry_delay * 2 ** (job.attempts - 1), 3600.0)
            self.journal.retry(job.id, reason, delay)
            self.metrics.observe("retry")
            log.warning("job %d (%s) attempt %d/%d: %s; retry in %.0f s", job.id, job.name, job.attempts,
                        cfg.max_attempts, reason, delay, exc_info=exc, extra=extra | {"event": "retry"})
            return "retry"
        if not permanent:
            reason = f"{reason} (gave up after {job.attempts} attempts)"
            log.error("job %d (%s) failed", job.id, job.name, exc_info=exc)
        self.quarantine(job, reason)
        return "failed"

    # -- files of the inputs -----------------------------------------------------------------
    def quarantine(self, job: Job, reason: str) -> None:
        """Mark a job failed and move its input (and sidecars) to quarantine with a reason file."""
        dest = self.config.quarantine / job.name
        self.journal.mark_failed(job.id, reason, moved_to=str(dest))
        self.metrics.observe("failed")
        self.move_input(job.input, dest, reason=reason, job=job)
        log.error("job %d failed, %s quarantined: %s", job.id, job.name, reason,
                  extra={"job": job.id, "input": job.input, "event": "failed", "error": reason})

    def move_input(self, src: str | Path, dest: str | Path, *, reason: str | None = None,
                   job: Job | None = None) -> bool:
        """Move an input and its sidecars to ``dest``'s directory (writing the reason file first)."""
        src, dest = Path(src), Path(dest)
        if not src.exists() or src == dest:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        if reason is not None:
            lines = [reason, f"input: {src}", f"time: {datetime.now(timezone.utc).isoformat(timespec='seconds')}"]
            if job is not None:
                lines += [f"job: {job.id}", f"attempts: {job.attempts}", f"template: {job.template}"]
            _write_text(dest.with_name(dest.name + ".reason.txt"), "\n".join(lines) + "\n")
        for side in find_sidecars(src).files():
            _move(side, dest.parent / side.name)
        _move(src, dest)
        return True

    # -- recovery ----------------------------------------------------------------------------
    def resolve_commit(self, job: Job) -> str:
        """Roll an interrupted commit forward (all files staged or final) or back; returns which."""
        plan = job.commit_plan
        if all(os.path.exists(s) or os.path.exists(f) for s, f in plan):
            self._finish(job, plan)
            log.warning("job %d (%s): interrupted commit rolled forward", job.id, job.name)
            return "forward"
        for pair in plan:
            for path in pair:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self.journal.abort_commit(job.id)
        log.warning("job %d (%s): interrupted commit rolled back, re-queued", job.id, job.name)
        return "back"

    def recover(self) -> None:
        """Recover after a crash: commits, jobs left running, pending moves, orphan files.

        Call only while holding the journal's lock, before any job runs.
        """
        cfg = self.config
        rec = self.journal.recover(cfg.max_crashes)
        for job in rec.committing:
            self.resolve_commit(job)
        for job in rec.requeued:
            log.warning("job %d (%s) was running when the daemon stopped: re-queued", job.id, job.name,
                        extra={"job": job.id, "input": job.input, "event": "recovered"})
        for job in rec.failed:
            self.quarantine(job, job.error or "the daemon died while processing it")
        for job in self.journal.pending_moves():
            if job.moved_to and os.path.exists(job.input):
                reason = job.error if job.state == "failed" else None
                self.move_input(job.input, job.moved_to, reason=reason, job=job)
                log.info("job %d: finished moving %s to %s", job.id, job.name, job.moved_to)
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the staging directory and temporary files of the daemon (no job may be running)."""
        cfg = self.config
        shutil.rmtree(cfg.outbox / STAGING, ignore_errors=True)
        for directory in (cfg.outbox, cfg.quarantine, cfg.archive):
            if directory is not None and directory.is_dir():
                for tmp in directory.glob(TMP_PREFIX + "*"):
                    with contextlib.suppress(OSError):
                        tmp.unlink()


# ============================================================================ the daemon
class Daemon:
    """The watch / claim / run loop (see the module documentation).

    Parameters
    ----------
    config : DaemonConfig
    subtract : callable, optional
        The subtraction function (default :func:`zogy_stream.pipeline.subtract`).
    """

    def __init__(self, config: DaemonConfig, subtract: SubtractFn | None = None) -> None:
        self.config = config
        self.subtract = subtract or _default_subtract()
        self.stopping = threading.Event()
        self.cancel = threading.Event()
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self._wake = threading.Event()
        self._events = threading.Event()
        self._moved: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._threads: dict[int, threading.Thread] = {}
        self._handled: dict[str, tuple[int, int]] = {}

    def request_stop(self, cancel: bool = False) -> None:
        """Stop taking jobs (and cancel running ones when ``cancel``); safe from signal handlers."""
        if cancel or self.stopping.is_set():
            self.cancel.set()
        self.stopping.set()
        self._wake.set()

    def _signal(self, signum: int, frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        self.request_stop()

    def run(self) -> bool:
        """Run until stopped.

        Returns
        -------
        bool
            True when every job thread ended before ``shutdown_timeout``
            (False: some are stuck; their jobs are re-queued at the next start).
        """
        cfg = self.config
        for directory in (cfg.outbox, cfg.quarantine, cfg.archive, cfg.state.parent):
            if directory is not None:
                directory.mkdir(parents=True, exist_ok=True)
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._signal) for s in (signal.SIGTERM, signal.SIGINT)}
        observer = server = backend = None
        clean = False
        try:
            with state_lock(cfg.state):
                journal = Journal(cfg.state)
                runner = None
                try:
                    library = TemplateLibrary(cfg.templates, cfg.template_keys, hdu=cfg.template_hdu,
                                              min_overlap=cfg.min_overlap)
                    runner = JobRunner(cfg, journal, library, self.subtract, cancel=self.cancel,
                                       metrics=self.metrics)
                    runner.recover()
                    if cfg.dask:
                        backend = runner.backend = DaskBackend(cfg.dask)
                    slots = backend.slots if backend is not None else cfg.workers
                    if cfg.metrics_port is not None:
                        server = serve_metrics(cfg.metrics_port, lambda: self.metrics.render(
                            journal.counts(), len(self._threads)))
                        self.metrics_port = server.server_address[1]
                    if cfg.watch:
                        observer = _start_watcher(cfg.inbox, self._moved.put, self._on_event)
                    log.info("daemon started: inbox %s, %d slot(s)%s", cfg.inbox, slots,
                             "" if self.metrics_port is None else f", metrics on 127.0.0.1:{self.metrics_port}",
                             extra={"event": "started", "pid": os.getpid(), "metrics_port": self.metrics_port})
                    self._loop(journal, runner, slots)
                finally:
                    clean = self._shutdown(observer, server, backend)
                    if clean and runner is not None:
                        with contextlib.suppress(Exception):
                            runner.cleanup()
                        journal.close()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        log.info("daemon stopped%s", "" if clean else " (some jobs abandoned)", extra={"event": "stopped"})
        return clean

    def _on_event(self) -> None:
        self._events.set()
        self._wake.set()

    def _loop(self, journal: Journal, runner: JobRunner, slots: int) -> None:
        cfg = self.config
        tracker = ArrivalTracker(cfg.settle_seconds)
        last_scan = -float("inf")
        while not self.stopping.is_set():
            try:
                while True:
                    try:
                        tracker.moved(self._moved.get_nowait())
                    except queue.Empty:
                        break
                now = time.monotonic()
                if now - last_scan >= cfg.poll_interval or (self._events.is_set() and now - last_scan >= 0.2):
                    self._events.clear()
                    last_scan = now
                    self._scan(journal, runner, tracker)
                for job_id in [j for j, t in self._threads.items() if not t.is_alive()]:
                    del self._threads[job_id]
                while len(self._threads) < slots and not self.stopping.is_set():
                    job = journal.claim(worker=runner.worker)
                    if job is None:
                        break
                    thread = threading.Thread(target=self._run_job, args=(runner, job),
                                              name=f"zogy-job-{job.id}", daemon=True)
                    self._threads[job.id] = thread
                    thread.start()
            except Exception:  # noqa: BLE001 - keep going (e.g. a busy database, a vanished file)
                log.exception("error in the daemon loop (continuing)")
            self._wake.wait(min(cfg.poll_interval, 0.5))
            self._wake.clear()

    def _run_job(self, runner: JobRunner, job: Job) -> None:
        try:
            runner.run(job)
        except Exception:  # noqa: BLE001 - e.g. the journal failed: the job is recovered at restart
            log.exception("job %d: unexpected error", job.id)
        finally:
            self._wake.set()

    def _scan(self, journal: Journal, runner: JobRunner, tracker: ArrivalTracker) -> None:
        with os.scandir(self.config.inbox) as it:
            entries = list(it)
        present = {e.path for e in entries}
        for entry in sorted((e for e in entries if image_stem(e.name) is not None), key=lambda e: e.name):
            path = entry.path
            try:
                if not entry.is_file():
                    continue
                st = entry.stat()
            except OSError:
                continue
            fingerprint = (st.st_size, st.st_mtime_ns)
            if self._handled.get(path) == fingerprint or not tracker.ready(path, st):
                continue
            sides_ready = True
            for side in find_sidecars(path).files():  # sidecars must be complete too
                with contextlib.suppress(OSError):
                    sides_ready &= tracker.ready(str(side), side.stat())
            if not sides_ready:
                continue
            self._register(journal, runner, Path(path), st)
            self._handled[path] = fingerprint
        tracker.prune(present)
        for path in set(self._handled) - present:
            del self._handled[path]

    def _register(self, journal: Journal, runner: JobRunner, path: Path, st: os.stat_result) -> None:
        job = journal.get(str(path))
        if job is not None and (job.size, job.mtime_ns) == (st.st_size, st.st_mtime_ns):
            return
        try:
            checksum = file_checksum(path)
        except FileNotFoundError:
            return
        job, action = journal.submit(str(path), checksum, st.st_size, st.st_mtime_ns)
        log.info("%s: %s (job %d)", path.name, action, job.id,
                 extra={"job": job.id, "input": str(path), "event": action})
        if action == "duplicate" and self.config.archive is not None:
            dest = self.config.archive / path.name
            journal.set_moved(job.id, str(dest))
            runner.move_input(path, dest)
        self._wake.set()

    def _shutdown(self, observer: Any, server: Any, backend: DaskBackend | None) -> bool:
        cfg = self.config
        self.stopping.set()
        start = time.monotonic()
        deadline = start + cfg.shutdown_timeout
        threads = list(self._threads.values())
        if threads:
            log.info("stopping: waiting for %d running job(s)", len(threads))
        for thread in threads:
            thread.join(max(0.0, start + cfg.shutdown_timeout / 2 - time.monotonic()))
        if any(t.is_alive() for t in threads):
            log.info("stopping: cancelling the running job(s)")
            self.cancel.set()
        for thread in threads:
            thread.join(max(0.0, deadline - 0.5 - time.monotonic()))
        if observer is not None:
            observer.stop()
            observer.join(timeout=max(0.05, min(1.0, deadline - 0.2 - time.monotonic())))
        if server is not None:
            server.shutdown()
            server.server_close()
        if backend is not None:
            backend.close(timeout=max(1.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)


# ============================================================================ commands
def _subtraction_hooks() -> tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], dict]]:
    """``subtraction_parent`` and ``subtract_kwargs`` of :mod:`zogy_stream.cli` (imported late: cli imports us)."""
    from . import cli
    return cli.subtraction_parent, cli.subtract_kwargs


def _parser_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        return vars(parser.parse_known_args([])[0])
    except SystemExit:  # a required option: fall back to the declared defaults
        return {a.dest: a.default for a in parser._actions if a.dest != argparse.SUPPRESS}


def _cmd_daemon(args: argparse.Namespace, *, sub_defaults: Mapping[str, Any],
                subtract: SubtractFn | None) -> int:
    try:
        cfg = config_from_args(args, sub_defaults)
    except (ConfigError, OSError) as exc:
        print(f"zogy-stream daemon: error: {exc}", file=sys.stderr)
        return 2
    level = cfg.log_level
    if "log_level" not in vars(args) and getattr(args, "verbose", False):
        level = "DEBUG"
    elif "log_level" not in vars(args) and getattr(args, "quiet", False):
        level = "WARNING"
    configure_logging(cfg.log_json, level)
    try:
        clean = Daemon(cfg, subtract=subtract).run()
    except ZogyError as exc:
        log.error("%s", exc)
        return 2
    if not clean:  # job threads stuck in a long tile: leave now, they are recovered at the next start
        logging.shutdown()
        os._exit(0)
    return 0


def _state_path(args: argparse.Namespace) -> Path:
    if getattr(args, "state", None):
        return Path(args.state)
    if getattr(args, "config", None):
        path = Path(args.config)
        state = _read_toml(path).get("state")
        if state:
            return _coerce("state", "path", state, path.resolve().parent)
    raise ConfigError("give --state DB (or --config with a state key)")


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        state = _state_path(args)
        journal = Journal(state, create=False)
    except Exception as exc:  # noqa: BLE001 - one clear line
        print(f"zogy-stream status: error: {exc}", file=sys.stderr)
        return 2
    with journal:
        status = journal.status(n_failures=args.failures)
    pid = daemon_pid(state)
    if args.json:
        print(json.dumps(status.to_dict() | {"journal": str(state), "daemon_pid": pid}, indent=2))
    else:
        print(f"journal {state}: daemon " + ("not running" if pid is None else f"running (pid {pid})"))
        print(status.format())
    return 0


def restore_input(job: Job) -> bool:
    """Move a quarantined or archived input (and its sidecars) back to its original path."""
    if not job.moved_to or os.path.exists(job.input) or not os.path.exists(job.moved_to):
        return False
    src, dest = Path(job.moved_to), Path(job.input)
    for side in find_sidecars(src).files():
        _move(side, dest.parent / side.name)
    _move(src, dest)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src.with_name(src.name + ".reason.txt"))
    return True


def _cmd_requeue(args: argparse.Namespace) -> int:
    states = {"failed"} if args.failed else set()
    states |= {"done"} if args.done else set()
    states |= {"failed", "done"} if args.all else set()
    if not states:
        states = {"failed", "done", "queued"} if args.inputs else {"failed"}
    try:
        journal = Journal(_state_path(args), create=False)
    except Exception as exc:  # noqa: BLE001 - one clear line
        print(f"zogy-stream requeue: error: {exc}", file=sys.stderr)
        return 2
    with journal:
        jobs = [j for j in journal.select(sorted(states), args.inputs or None) if j.state != "running"]
        for job in jobs:
            if restore_input(job):
                print(f"restored {job.input}")
        n = journal.requeue_ids(j.id for j in jobs)
    for job in jobs:
        print(f"requeued {job.name} (was {job.state}{': ' + job.error if job.error else ''})")
    print(f"{n} job(s) requeued")
    return 0


def add_commands(subparsers: Any, subtraction_parent: Any = None, common: argparse.ArgumentParser | None = None,
                 *, subtract: SubtractFn | None = None) -> None:
    """Add the ``daemon``, ``status`` and ``requeue`` subcommands.

    Parameters
    ----------
    subparsers
        The object returned by ``ArgumentParser.add_subparsers``.
    subtraction_parent : callable or argparse.ArgumentParser, optional
        The parser (or a function making it) of the ``subtract`` options; its
        options become daemon flags and TOML keys (dest names).  Default
        ``zogy_stream.cli.subtraction_parent``.
    common : argparse.ArgumentParser, optional
        Parent parser of options shared by all commands (``-q``, ``-v``, ``--debug``).
    subtract : callable, optional
        Subtraction function for the daemon (tests inject faults here).
    """
    shared = [] if common is None else [common]
    if subtraction_parent is None:
        subtraction_parent = _subtraction_hooks()[0]
    if isinstance(subtraction_parent, argparse.ArgumentParser):
        parent = copy.deepcopy(subtraction_parent)
    else:
        parent = subtraction_parent()
    sub_defaults = _parser_defaults(parent)
    for action in parent._actions:
        action.default = argparse.SUPPRESS
    p = subparsers.add_parser(
        "daemon", parents=[*shared, parent], conflict_handler="resolve",
        help="watch an inbox and subtract each exposure from its template",
        description="Watch INBOX; subtract every complete exposure from its template exactly once. "
                    "Settings come from --config (TOML) and the flags below; flags win. Every TOML key "
                    "is the flag name with '_' for '-'. SIGTERM/SIGINT stop it cleanly.")
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="TOML", help="TOML settings file")
    for name, kind, text in _FIELDS:
        flag = "--" + name.replace("_", "-")
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            metavar = {"dir": "DIR", "path": "PATH", "path?": "PATH", "int": "N", "int?": "N",
                       "float": "S", "list": "K1,K2"}.get(kind, "VALUE")
            p.add_argument(flag, default=argparse.SUPPRESS, metavar=metavar, help=text)
    p.set_defaults(func=functools.partial(_cmd_daemon, sub_defaults=sub_defaults, subtract=subtract))

    s = subparsers.add_parser("status", parents=shared,
                              help="job counts, throughput and last failures of a daemon journal")
    s.add_argument("--state", metavar="DB", help="the daemon's SQLite journal")
    s.add_argument("--config", metavar="TOML", help="read the journal path from the daemon's config")
    s.add_argument("--failures", type=int, default=5, metavar="N", help="failures to list (default 5)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_status)

    r = subparsers.add_parser("requeue", parents=shared, help="put jobs of a daemon journal back in the queue")
    r.add_argument("inputs", nargs="*", metavar="INPUT", help="only these inputs (path or file name)")
    r.add_argument("--state", metavar="DB", help="the daemon's SQLite journal")
    r.add_argument("--config", metavar="TOML", help="read the journal path from the daemon's config")
    r.add_argument("--failed", action="store_true", help="failed jobs (the default); their inputs come "
                   "back from quarantine")
    r.add_argument("--done", action="store_true", help="done jobs (they are redone)")
    r.add_argument("--all", action="store_true", help="failed and done jobs")
    r.set_defaults(func=_cmd_requeue)


def main(argv: list[str] | None = None, *, subtract: SubtractFn | None = None) -> int:
    """Entry point of ``python -m zogy_stream.daemon {daemon,status,requeue} ...``."""
    parser = argparse.ArgumentParser(prog="zogy-stream")
    add_commands(parser.add_subparsers(dest="command", required=True), subtract=subtract)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
