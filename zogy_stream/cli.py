"""Command line: ``zogy-stream subtract | demo | daemon | status | requeue``.

``main(argv=None) -> int`` configures logging (the library never does),
turns every user error into one line on stderr with a non-zero exit status,
and never shows a traceback unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path

from .errors import Cancelled, ConfigError, ZogyError
from .options import word_or_number

__all__ = ["main", "subtraction_parent", "subtract_kwargs"]

log = logging.getLogger("zogy_stream")

EXIT_INPUT = 2      # bad input / options
EXIT_RUNTIME = 1    # I/O or processing failure
EXIT_INTERNAL = 3   # a bug: please report
EXIT_INTERRUPT = 130


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message."""

    def error(self, message: str):  # noqa: D102
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, minimum, *, strict: bool):
    """argparse type: a ``kind`` number > ``minimum`` (``strict``) or >= it."""
    word = "a whole number" if kind is int else "a number"
    rel = ">" if strict else ">="

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {word}, got {text!r}") from None
        if not (v > minimum if strict else v >= minimum):  # NaN fails too
            raise argparse.ArgumentTypeError(f"expected {word} {rel} {minimum}, got {v}")
        return v

    return parse


_positive_int = _number(int, 1, strict=False)
_nonneg_int = _number(int, 0, strict=False)
_positive_float = _number(float, 0, strict=True)
_nonneg_float = _number(float, 0, strict=False)


def _word_or_number(words: tuple[str, ...], ok, requirement: str):
    """argparse type: one of ``words`` or a number satisfying ``ok`` (as Options checks it)."""
    def parse(text: str):
        try:
            return word_or_number("value", text, words, ok, requirement)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None
    return parse


_flux_ratio = _word_or_number(("auto", "local"), lambda v: v > 0, "> 0")
_model_error = _word_or_number(("auto",), lambda v: 0 <= v <= 1, "in [0, 1]")


def _odd_int(text: str) -> int:
    v = _positive_int(text)
    if v < 3 or v % 2 == 0:
        raise argparse.ArgumentTypeError(f"expected an odd number >= 3, got {v}")
    return v


def _astrometric_sigma(values):
    if len(values) == 1 and values[0].strip().lower() == "auto":
        return "auto"
    if len(values) != 2:
        raise argparse.ArgumentTypeError("--astrometric-sigma takes SX SY or auto")
    return tuple(_nonneg_float(v) for v in values)


def _common_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output and logging")
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bar")
    g.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    g.add_argument("--debug", action="store_true", help="debug logging and tracebacks of errors")
    return p


def subtraction_parent() -> argparse.ArgumentParser:
    """Parser (add_help=False) with every subtraction option, shared by
    ``subtract`` and ``daemon``."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("inputs")
    g.add_argument("--new-psf", metavar="F",
                   help="PSF of NEW: a centred PSF image FITS or a PSFEx .psf model "
                        "(default: estimated from the stars, per tile)")
    g.add_argument("--ref-psf", metavar="F", help="PSF of REF (as --new-psf)")
    g.add_argument("--psf-size", metavar="N", type=_odd_int,
                   help="odd side of estimated/PSFEx PSFs (default from the FWHM)")
    g.add_argument("--no-local-psf", action="store_true",
                   help="estimated PSFs: use the mosaic-wide PSF for every tile")
    g.add_argument("--new-var", metavar="F", help="per-pixel variance map of NEW")
    g.add_argument("--ref-var", metavar="F", help="per-pixel variance map of REF")
    g.add_argument("--new-mask", metavar="F", help="bad-pixel mask of NEW (non-zero = bad)")
    g.add_argument("--ref-mask", metavar="F", help="bad-pixel mask of REF (non-zero = bad)")
    g.add_argument("--new-weight", metavar="F",
                   help="inverse-variance weight map of NEW (variance = 1/w; w <= 0 masked)")
    g.add_argument("--ref-weight", metavar="F", help="inverse-variance weight map of REF")
    g.add_argument("--new-err", metavar="F",
                   help="1-sigma error map of NEW, e.g. file.fits[ERR] (variance = err^2; "
                        "err <= 0 masked)")
    g.add_argument("--ref-err", metavar="F", help="1-sigma error map of REF")
    g.add_argument("--gain", metavar="G", type=_positive_float,
                   help="gain of both images in e-/ADU (overrides the header)")
    g.add_argument("--gain-key", metavar="KEY", default="GAIN",
                   help="header keyword of the gain (default GAIN)")
    g.add_argument("--saturate-key", metavar="KEY", default="SATURATE",
                   help="header keyword of the saturation level (default SATURATE)")
    g.add_argument("--new-gain", metavar="G", type=_positive_float,
                   help="gain of NEW in e-/ADU for the Poisson variance (default: GAIN keyword)")
    g.add_argument("--ref-gain", metavar="G", type=_positive_float, help="gain of REF (default: GAIN keyword)")
    g.add_argument("--new-saturation", metavar="ADU", type=_positive_float,
                   help="saturation level of NEW (default: the --saturate-key keyword, else "
                        "detected from a pile-up at the data maximum)")
    g.add_argument("--ref-saturation", metavar="ADU", type=_positive_float,
                   help="saturation level of REF (default: as for NEW)")
    g = p.add_argument_group("ZOGY")
    g.add_argument("--flux-ratio", metavar="F|auto|local", type=_flux_ratio, default="auto",
                   help="F_n/F_r, the new image's flux scale relative to REF: a number, auto "
                        "(default: fitted from matched stars) or local (per tile)")
    g.add_argument("--astrometric-sigma", metavar="SX SY|auto", nargs="+",
                   help="registration noise in pixels for V_ast, or auto (from matched "
                        "stars; default: auto when stars are matched anyway, i.e. for an "
                        "estimated PSF or flux ratio, else 0 0)")
    g.add_argument("--no-registration", action="store_true",
                   help="do not fold the residual sub-pixel offset of matched stars into "
                        "NEW's PSF")
    g.add_argument("--model-error", metavar="E|auto", type=_model_error, default="auto",
                   help="fractional error of the PSF/flux model of static sources: "
                        "E^2 min(S_N, S_R)^2 joins the variance of S_corr so imperfectly "
                        "modelled bright stars leave no candidates (default auto: fitted per "
                        "tile to its bright stars; 0: off)")
    g.add_argument("--no-noise-correction", action="store_true",
                   help="do not rescale S_corr per tile to unit dispersion on blank sky")
    g.add_argument("--no-deblend", action="store_true",
                   help="keep each S_corr peak one candidate (default: a peak that is two "
                        "point sources, e.g. two transients on one host, becomes two)")
    g.add_argument("--cosmic-rays", choices=("auto", "on", "off"), default="auto",
                   help="mask cosmic rays (auto: on for single exposures given without "
                        "variance/weight/error map or mask, off for coadds with NCOMBINE > 1)")
    g.add_argument("--zeropoint", metavar="ZP", type=float,
                   help="zero point of REF units: adds mag, mag_err to the catalogue")
    g.add_argument("--no-background", action="store_true",
                   help="images are background-subtracted already")
    g.add_argument("--bkg-mesh", metavar="N", type=_positive_int, default=256,
                   help="background mesh cell in pixels (default 256)")
    g.add_argument("--threshold", metavar="T", type=_positive_float, default=5.0,
                   help="|S_corr| threshold for candidates (default 5)")
    g = p.add_argument_group("performance")
    g.add_argument("--tile", metavar="N", type=_positive_int, default=1024,
                   help="tile core size in pixels (default 1024)")
    g.add_argument("--overlap", metavar="N", type=_positive_int,
                   help="tile overlap in pixels (default: derived from the ZOGY kernels)")
    g.add_argument("--threads", metavar="N", type=_positive_int, help="threads (default: all CPUs)")
    g.add_argument("--image-space", action="store_true",
                   help="direct convolutions with trimmed real-space kernels instead of FFTs")
    g.add_argument("--wisdom", metavar="PATH",
                   help="FFTW wisdom file (default $ZOGY_STREAM_WISDOM or ~/.cache/zogy_stream/fftw_wisdom)")
    g.add_argument("--no-wisdom", action="store_true", help="do not read or write FFTW wisdom")
    g.add_argument("--fft-effort", choices=("estimate", "measure", "patient"), default="measure",
                   help="FFTW planner effort (default measure; planned once, cached as wisdom)")
    g.add_argument("--dask", metavar="ADDRESS",
                   help="run on Dask distributed: a scheduler address or local:N (N workers)")
    g.add_argument("--no-settle", action="store_true",
                   help="leave the output's write-back to the kernel instead of writing each "
                        "finished band to disk and dropping it from the page cache as the run "
                        "goes (faster on a slow disk with memory to spare)")
    g.add_argument("--write-buffer", metavar="MB", type=_nonneg_int,
                   help="MiB for gathering whole rows of output tiles, written with direct "
                        "I/O past the page cache when a tile row of all planes fits "
                        "(default 256; 0: write through the memory map)")
    g.add_argument("--parallel-tiles", metavar="N", type=_nonneg_int,
                   help="tiles processed at once, sharing --threads (default 0: 2 when "
                        "there are >= 2 threads and the output is written in row bands, "
                        "else 1; ~150 MiB more a tile)")
    return p


def _ast_kw(values):
    from .errors import ConfigError

    if values is None or isinstance(values, (str, tuple)):
        return values
    try:
        return _astrometric_sigma(list(values))
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"argument --astrometric-sigma: {exc}") from None


def subtract_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`zogy_stream.subtract` from parsed options."""
    return dict(
        new_psf=args.new_psf, ref_psf=args.ref_psf, new_var=args.new_var, ref_var=args.ref_var,
        new_mask=args.new_mask, ref_mask=args.ref_mask, new_gain=args.new_gain,
        ref_gain=args.ref_gain, new_saturation=args.new_saturation,
        ref_saturation=args.ref_saturation, flux_ratio=args.flux_ratio,
        astrometric_sigma=_ast_kw(args.astrometric_sigma), background=not args.no_background,
        new_weight=args.new_weight, ref_weight=args.ref_weight, new_err=args.new_err,
        ref_err=args.ref_err, gain=args.gain,
        gain_key=args.gain_key, saturate_key=args.saturate_key, psf_size=args.psf_size,
        local_psf=not args.no_local_psf, noise_correction=not args.no_noise_correction,
        deblend=not args.no_deblend,
        model_error=args.model_error,
        cosmic_rays=args.cosmic_rays, zeropoint=args.zeropoint,
        registration=not args.no_registration,
        bkg_mesh=args.bkg_mesh, threshold=args.threshold, tile=args.tile, overlap=args.overlap,
        threads=args.threads, image_space=args.image_space,
        wisdom=False if args.no_wisdom else args.wisdom, fft_effort=args.fft_effort,
        dask=args.dask, settle=not args.no_settle, write_buffer=args.write_buffer,
        parallel_tiles=args.parallel_tiles,
    )


# -------------------------------------------------------------------- commands
def _cmd_subtract(args) -> int:
    from .pipeline import subtract

    summary = subtract(args.new, args.ref, args.output, catalog=args.catalog,
                       stamps=args.stamps, png=args.png,
                       progress=not args.quiet, **subtract_kwargs(args))
    ny, nx = summary.shape
    print(f"{summary.out}: {nx}x{ny}, {summary.n_tiles} tiles, {summary.n_candidates} candidates"
          + (f" -> {summary.catalog}" if summary.catalog else "")
          + f", {summary.seconds:.2f} s ({summary.mpix_per_s:.1f} Mpix/s)")
    if args.timings:
        for stage, secs in summary.timings.items():
            print(f"  {stage:12s} {secs:8.3f} s")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(Path(args.outdir), size=args.size, seed=args.seed, threads=args.threads,
                      progress=not args.quiet)
    print(report)
    return 0


#: Commands of this module; any other (``daemon``, ``status``, ``requeue``) comes
#: from the daemon module, imported only when needed (~0.08 s of start-up).
_OWN_COMMANDS = ("subtract", "demo")


def build_parser(*, command: str | None = None) -> argparse.ArgumentParser:
    """The ``zogy-stream`` argument parser.

    ``command``, the subcommand about to be parsed: when it is one of this
    module's own (``subtract``, ``demo``), the daemon's commands are left out.
    """
    common = _common_parent()
    parser = _Parser(prog="zogy-stream", description="Streaming ZOGY proper image subtraction.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"zogy-stream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sp = sub.add_parser("subtract", parents=[common, subtraction_parent()],
                        help="subtract REF from NEW into a multi-extension FITS file",
                        description="ZOGY subtraction of REF from NEW (registered on one grid).")
    sp.add_argument("new", metavar="NEW.fits", help="new (science) image; file.fits[N] selects an HDU")
    sp.add_argument("ref", metavar="REF.fits", help="reference image on the same pixel grid")
    sp.add_argument("-o", "--output", metavar="OUT.fits", required=True, help="output FITS file")
    sp.add_argument("--catalog", metavar="CAT.ecsv", help="write candidates (ECSV, or FITS by suffix)")
    sp.add_argument("--stamps", metavar="STAMPS.fits",
                    help="31x31 cut-outs of NEW, REF, D and S_corr per candidate")
    sp.add_argument("--png", metavar="QUICKLOOK.png",
                    help="down-sampled S_corr with candidates circled (needs matplotlib)")
    sp.add_argument("--timings", action="store_true", help="print the time spent per stage")
    sp.set_defaults(func=_cmd_subtract)
    dp = sub.add_parser("demo", parents=[common], help="simulate a scene and subtract it",
                        description="Make a synthetic new/reference pair with transients in "
                                    "OUTDIR, subtract it and check the recovered transients.")
    dp.add_argument("outdir", metavar="OUTDIR")
    dp.add_argument("--size", type=_positive_int, default=2048, help="image side (default 2048)")
    dp.add_argument("--seed", type=int, default=1)
    dp.add_argument("--threads", type=_positive_int)
    dp.set_defaults(func=_cmd_demo)
    add_commands = None
    if command not in _OWN_COMMANDS:
        try:
            from .daemon import add_commands
        except ImportError:  # daemon extras not installed
            add_commands = None
    if add_commands is not None:
        add_commands(sub, subtraction_parent, common)
    return parser


def _configure_logging(args) -> None:
    # Default WARNING: a run prints its one summary line on stdout and
    # nothing else, and a failing run exactly one error line on stderr.
    level = logging.DEBUG if getattr(args, "debug", False) else (
        logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("zogy_stream")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _one_malloc_arena() -> None:
    """One glibc malloc arena for all threads of this process (no-op elsewhere).

    The reader, engine and writer threads allocate and free tile-sized arrays;
    with an arena each, every arena keeps its own free holes (measured at
    8192²: 0.3 s more page faults, or ~50 MB more resident memory).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _one_blas_thread() -> None:
    """BLAS libraries (numpy's and scipy's OpenBLAS) at one thread for this process.

    Their only work here is small (least-squares fits of a few stars, a
    candidate's profile fits), but their idle worker threads spin after each
    call, beside the tile threads that own the cores (measured at 8192²:
    ``blas_thread_server`` 2.5 % of all CPU samples; the run 0.2 s faster
    without, 4.00-4.15 against 4.26-4.42 s).  threadpoolctl limits the
    libraries loaded now (numpy's); scipy loads its own OpenBLAS where
    scipy.linalg is first used, and reads ``OPENBLAS_NUM_THREADS`` then (its
    threads were 2.7 % of the CPU samples of an 8192² run until this was set).
    Child processes (a local Dask cluster's workers) inherit that setting.
    """
    from threadpoolctl import threadpool_limits

    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    threadpool_limits(limits=1, user_api="blas")


def main(argv=None) -> int:
    """Entry point of the ``zogy-stream`` console script; returns the exit status."""
    words = sys.argv[1:] if argv is None else list(argv)
    # the command is the first word (the top level's only options, -h and --version,
    # print the full help or exit before any command)
    command = words[0] if words and not words[0].startswith("-") else None
    parser = build_parser(command=command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_INPUT
    lg = logging.getLogger("zogy_stream")
    saved = (lg.handlers[:], lg.level, lg.propagate)
    _configure_logging(args)
    try:
        return _run(args, argv)
    finally:  # embedded calls (notebooks, tests) get their logging set-up back
        lg.handlers[:] = saved[0]
        lg.setLevel(saved[1])
        lg.propagate = saved[2]


def _run(args, argv) -> int:
    if argv is None:
        # The console script owns this process: move the million objects the imports
        # made out of the collector's sight, so full collections triggered by per-tile
        # allocations stop re-scanning them (measured: ~4% of a run's CPU otherwise).
        gc.freeze()
        _one_malloc_arena()
        _one_blas_thread()
    prog = f"zogy-stream {args.command}"
    try:
        return int(args.func(args) or 0)
    except Cancelled as exc:
        print(f"{prog}: stopped: {exc}", file=sys.stderr)
        return EXIT_INTERRUPT
    except ZogyError as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except OSError as exc:
        if args.debug:
            raise
        where = f" '{exc.filename}'" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except MemoryError:
        print(f"{prog}: error: out of memory; use a smaller --tile", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as exc:  # a bug: one line, details with --debug
        if args.debug:
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (rerun with --debug and "
              "report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
