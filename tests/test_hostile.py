"""The hostile-input corpus: uploads, checkpoints, dataset folders, numbers and paths.

Each input gets one sentence naming the fix (a non-zero exit, or an upload refused with its
message), never a traceback, and leaves the data directory as it was; inputs that are odd but
valid (16-bit, CMYK, mixed sizes, link loops, non-UTF-8 names, spaces) simply work. The
README gives the corpus's size: `python -m pytest tests/test_hostile.py --collect-only -q`.
"""
from __future__ import annotations

import errno
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cacheviz.__main__ import main
from cacheviz.errors import CachevizError
from cacheviz.images import decode_upload


# ---------------------------------------------------------------------------------------------
# Uploads


def _png(arr, mode=None, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, fmt, **kw)
    return buf.getvalue()


def _bomb(side=30000) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(b"\x00" * (1 + side // 8)) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _header_only_giant() -> bytes:
    """A PNG header that claims 100000 x 100000 pixels and holds none."""
    head = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + head + struct.pack(">I", zlib.crc32(b"IHDR" + head))


def _gif_animated() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16, 16), 0).save(buf, "GIF", save_all=True, append_images=[Image.new("L", (16, 16), 255)])
    return buf.getvalue()


def _palette_transparent() -> bytes:
    im = Image.new("P", (20, 20), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0)
    return buf.getvalue()


def _cmyk() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (24, 24), (0, 120, 0, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _exif_rotated() -> bytes:
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    return buf.getvalue()


GOOD = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
UPLOADS = {
    # refused, with the words the sentence must hold
    "renamed-text.png": (b"just some text, renamed\n" * 40, "not an image"),
    "empty.png": (b"", "empty"),
    "truncated.png": (_png(GOOD)[:200], "damaged or truncated"),
    "truncated.jpg": (_png(GOOD, fmt="JPEG")[:300], "damaged or truncated"),
    "one-pixel.png": (_png(np.zeros((1, 1, 3), np.uint8)), "only 1x1 pixels"),
    "bomb.png": (_bomb(), "pixels"),
    "header-only-giant.png": (_header_only_giant(), "upload"),
    "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>', "not an image"),
    "huge.png": (b"\x89PNG" + b"\x00" * (11 * 2**20), "MB"),
    "archive.png": (_zip_bytes(), "not an image"),
    "page.png": (b"<html><script>alert(1)</script></html>", "not an image"),
    "paper.jpg": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", "not an image"),
    "<script>alert(1)</script>**bold**.png": (b"nope", "not an image"),
    "../../etc/passwd.png": (b"nope", "not an image"),
    # odd but valid: decoded to RGB
    "deep16.png": (_png((np.eye(12) * 60000).astype(np.uint16)), None),
    "cmyk.jpg": (_cmyk(), None),
    "palette-transparent.png": (_palette_transparent(), None),
    "animated.gif": (_gif_animated(), None),
    "rotated.jpg": (_exif_rotated(), None),
    "gray-alpha.png": (_png(np.zeros((10, 10, 2), np.uint8), "LA"), None),
}


@pytest.mark.parametrize("name", list(UPLOADS))
def test_uploads(name):
    data, words = UPLOADS[name]
    if words is None:
        img = decode_upload(data, name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        if name == "rotated.jpg":
            assert img.shape[:2] == (40, 20)  # EXIF orientation applied
        return
    with pytest.raises(CachevizError) as err:
        decode_upload(data, name)
    msg = str(err.value)
    assert words in msg and "\n" not in msg and msg.endswith(".") and "upload" in msg.lower(), msg


def test_upload_names_are_shown_literally():
    from cacheviz.ui.messages import upload_name

    # "/" ends a folder name, so a name with markup keeps only what follows its last "/"
    assert upload_name("<script>alert(1)</script>**bold**.png") == r"script\>\*\*bold\*\*\.png"
    assert upload_name("<b>[link](x)</b>.png") == r"b\>\.png"
    assert upload_name("*x*_[y](z).png") == r"\*x\*\_\[y\]\(z\)\.png"
    assert upload_name("../../etc/passwd.png") == r"passwd\.png"
    assert upload_name("C:\\Users\\me\\x.png") == r"x\.png"
    assert upload_name("a\x00b\nc.png") == r"abc\.png"
    assert len(upload_name("x" * 500 + ".png")) <= 61


# ---------------------------------------------------------------------------------------------
# The data directory every command below runs against: it must stay as it was


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile data")  # a space in the path, on purpose
    assert main(["evaluate", "--data-dir", str(d)]) == 0
    return d


def _snapshot(d: Path) -> dict:
    # locks/ holds build locks: empty flock files kept on purpose once made (cacheviz/locks.py),
    # coordination rather than anything stored
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in d.rglob("*") if p.is_file() and p.relative_to(d).parts[0] != "locks"}


def _fails_cleanly(capsys, ddir, argv, words):
    before = _snapshot(ddir)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refuses some at once
        rc = e.code
    out, err = capsys.readouterr()
    assert rc not in (0, None), (argv, out, err)
    lines = [l for l in err.strip().splitlines() if l.startswith("error:") or "error:" in l]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "unexpected" not in err, err
    if words:
        assert words in lines[0], lines[0]
    assert _snapshot(ddir) == before, "the data directory changed"
    assert not [p for p in ddir.rglob("*.tmp")]


# ---------------------------------------------------------------------------------------------
# Checkpoints


class _Evil:
    def __reduce__(self):
        return (exec, (f"open({str(SENTINEL)!r}, 'w').write('ran')",))


SENTINEL = Path(os.environ.get("TMPDIR", "/tmp")) / "cacheviz-hostile-sentinel"


def _ckpt(kind: str, d: Path) -> Path:
    from cacheviz.models import DigitsCNN, build_cifar_resnet

    p = d / f"{kind}.pt"
    if kind == "text":
        p.write_text("these are not weights\n")
    elif kind == "zip":
        p.write_bytes(_zip_bytes())
    elif kind == "truncated":
        torch.save(DigitsCNN().state_dict(), p)
        p.write_bytes(p.read_bytes()[:500])
    elif kind == "other-architecture":
        torch.save(build_cifar_resnet(20).state_dict(), p)
    elif kind == "pickled-module":
        torch.save(DigitsCNN(), p)
    elif kind == "code-on-load":
        torch.save({"state_dict": _Evil()}, p)
    elif kind == "raw-pickle-code":
        p.write_bytes(pickle.dumps(_Evil()))
    elif kind in ("nan", "integer"):
        sd = DigitsCNN().state_dict()
        if kind == "nan":
            sd["fc1.weight"][0, 0] = float("nan")
        else:
            sd["fc1.weight"] = sd["fc1.weight"].round().to(torch.int64)
        torch.save(sd, p)
    elif kind == "empty-dict":
        torch.save({}, p)
    elif kind == "missing-keys":
        sd = DigitsCNN().state_dict()
        del sd["fc2.weight"]
        torch.save(sd, p)
    elif kind == "a-folder":
        p.mkdir()
    elif kind == "absent":
        pass
    return p


CHECKPOINTS = {
    "text": "could not be read", "zip": "could not be read", "truncated": "could not be read",
    "other-architecture": "does not fit digits-cnn", "pickled-module": "plain state_dict",
    "code-on-load": "plain state_dict", "raw-pickle-code": "", "nan": "NaN", "integer": "torch.int64",
    "empty-dict": "no state_dict", "missing-keys": "missing", "a-folder": "", "absent": "does not exist",
}


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_checkpoints(kind, ddir, tmp_path, capsys):
    SENTINEL.unlink(missing_ok=True)
    path = _ckpt(kind, tmp_path)
    _fails_cleanly(capsys, ddir, ["evaluate", "--data-dir", str(ddir), "--checkpoint", str(path)], CHECKPOINTS[kind])
    assert not SENTINEL.exists(), "loading a checkpoint ran code"


def test_a_resnet_checkpoint_for_another_depth_is_refused_before_building(ddir, tmp_path, capsys):
    from cacheviz.models import build_cifar_resnet

    p = tmp_path / "rn20.th"
    torch.save({"state_dict": build_cifar_resnet(20).state_dict()}, p)
    _fails_cleanly(capsys, ddir, ["layers", "--model", "resnet60002", "--checkpoint", str(p), "--data-dir", str(ddir)],
                   "3 blocks per stage, resnet60002 has 10000")
    _fails_cleanly(capsys, ddir, ["layers", "--model", "resnet60002", "--data-dir", str(ddir)],
                   "no published weights")


# ---------------------------------------------------------------------------------------------
# Dataset folders


def _tree(root: Path, classes=("a", "b"), n=4, size=(8, 8), parts=("train", "test")) -> Path:
    rng = np.random.default_rng(1)
    for part in parts:
        for c in classes:
            (root / part / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / part / c / f"{i}.png")
    return root


def _digit_tree(root: Path, **kw) -> Path:
    return _tree(root, classes=tuple(str(c) for c in range(10)), **kw)


FOLDERS = {
    "empty": (lambda r: r.mkdir(), "has no train/ subfolder"),
    "no-test": (lambda r: _digit_tree(r, parts=("train",)), "has no test/ subfolder"),
    "no-classes": (lambda r: ((r / "train").mkdir(parents=True), (r / "test").mkdir()), "no class subfolders"),
    "one-class": (lambda r: _tree(r, classes=("only",)), "predicts 10 classes but"),
    "stray-test-class": (lambda r: (_digit_tree(r), (r / "test" / "zebra").mkdir()), "no counterpart"),
    "no-images": (lambda r: [(r / p / str(c)).mkdir(parents=True) for p in ("train", "test") for c in range(10)],
                  "No image files"),
    "all-corrupt": (lambda r: [((r / p / str(c)).mkdir(parents=True), (r / p / str(c) / "x.png").write_bytes(b"bad"))
                               for p in ("train", "test") for c in range(10)], "No readable images"),
    "a-file": (lambda r: r.write_text("not a folder"), "does not exist"),
    "absent": (lambda r: None, "does not exist"),
}


@pytest.mark.parametrize("kind", list(FOLDERS))
def test_dataset_folders_that_cannot_serve(kind, ddir, tmp_path, capsys):
    root = tmp_path / "tree"
    FOLDERS[kind][0](root)
    _fails_cleanly(capsys, ddir, ["evaluate", "--dataset", f"folder:{root}", "--model", "digits-cnn",
                                  "--data-dir", str(ddir)], FOLDERS[kind][1])


@pytest.mark.parametrize("kind", ["corrupt-some", "mixed-sizes", "link-loop", "non-utf8-names", "spaces in names"])
def test_dataset_folders_that_are_odd_but_work(kind, tmp_path, capsys):
    root = _digit_tree(tmp_path / "tree", n=6)
    if kind == "corrupt-some":
        (root / "train" / "3" / "broken.png").write_bytes(b"\x89PNG broken")
    elif kind == "mixed-sizes":
        Image.fromarray(np.zeros((16, 12), np.uint8)).save(root / "train" / "4" / "big.png")
    elif kind == "link-loop":
        os.symlink(root / "train" / "5", root / "train" / "5" / "loop")
    elif kind == "non-utf8-names":
        name = os.fsdecode(b"caf\xe9-\xff.png")
        shutil.copy(root / "train" / "6" / "0.png", root / "train" / "6" / name)
    else:
        shutil.copy(root / "train" / "7" / "0.png", root / "train" / "7" / "a copy with spaces.png")
    d = tmp_path / "data dir"
    with _no_error():
        rc = main(["evaluate", "--dataset", f"folder:{root}", "--model", "digits-cnn", "--data-dir", str(d),
                   "--train-limit", "50"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "Traceback" not in err


class _no_error:
    def __enter__(self):
        import warnings

        self.ctx = warnings.catch_warnings()
        self.ctx.__enter__()
        warnings.simplefilter("ignore")  # skipped and resized images are announced, not errors

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# Numbers and paths on the command line


NUMBERS = {
    "train-limit-zero": (["--train-limit", "0"], "must be positive"),
    "train-limit-negative": (["--train-limit", "-5"], "must be positive"),
    "train-limit-huge": (["--train-limit", "10000000000"], "there are only 1348 training items"),
    "test-limit-huge": (["--test-limit", "999999"], "there are only 449 test items"),
    "test-limit-too-small": (["--test-limit", "3"], "one test item per class"),
    "seed-negative": (["--seed", "-1"], "--seed -1: give a whole number"),
    "seed-huge": (["--seed", str(2**70)], "give a whole number from 0 to"),
    "grid-zero": (["--grid", "0x9"], "--grid 0x9"),
    "grid-huge": (["--grid", "1000x1000"], "--grid 1000x1000"),
    "grid-words": (["--grid", "nine"], "9x9"),
    "project-dim-zero": (["--project-dim", "0"], "must be positive"),
    "val-from-train-huge": (["--val-from-train", "100000"], "leaves no training items"),
    "batch-size-zero": (["--batch-size", "0"], "must be positive"),
    "batch-size-huge": (["--batch-size", "100000000"], "--batch-size 100000000"),
    "device-unknown": (["--device", "tpu"], "--device tpu"),
    "model-empty": (["--model", ""], "an empty model name"),
    "model-unknown": (["--model", "vgg99"], "no such model"),
    "layers-unknown": (["--layers", "relu9"], "has no layer"),
    "dataset-unknown": (["--dataset", "imagenet-mini"], "no such dataset"),
    "folder-prefix-empty": (["--dataset", "folder:"], "no folder after the prefix"),
}


@pytest.mark.parametrize("case", list(NUMBERS))
def test_numbers_and_names(case, ddir, capsys):
    extra, words = NUMBERS[case]
    _fails_cleanly(capsys, ddir, ["evaluate", "--data-dir", str(ddir), "--force", *extra], words)


SWEEP_NUMBERS = {
    "fractions-above-one": (["sweep-size", "--fractions", "0,1.5"], "--fractions"),
    "fractions-negative": (["sweep-size", "--fractions", "-0.1,1"], "--fractions"),
    "fractions-words": (["sweep-size", "--fractions", "half"], "comma-separated numbers"),
    "seeds-words": (["sweep-size", "--seeds", "x"], "--seeds x"),
    "seeds-fractional": (["sweep-size", "--seeds", "0.5"], "--seeds 0.5"),
    "combine-top-zero": (["table1", "--combine-top", "0"], "must be positive"),
    "out-suffix": (["sweep-layers", "--out", "rows.txt"], "must end in .json or .csv"),
}


@pytest.mark.parametrize("case", list(SWEEP_NUMBERS))
def test_sweep_numbers(case, ddir, capsys):
    argv, words = SWEEP_NUMBERS[case]
    _fails_cleanly(capsys, ddir, [*argv, "--data-dir", str(ddir)], words)


def test_paths(ddir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _fails_cleanly(capsys, ddir, ["evaluate", "--data-dir", str(a_file)], "that is a file, not a folder")
    _fails_cleanly(capsys, ddir, ["evaluate", "--data-dir", str(a_file / "below")], "cannot be created")
    _fails_cleanly(capsys, ddir, ["evaluate", "--data-dir", str(ddir), "--json", str(tmp_path)], "that is a folder")
    _fails_cleanly(capsys, ddir, ["evaluate", "--data-dir", str(ddir), "--json", str(tmp_path / "no" / "r.json")],
                   "does not exist")
    _fails_cleanly(capsys, ddir, ["sweep-size", "--data-dir", str(ddir), "--out", str(tmp_path / "no" / "r.csv")],
                   "does not exist")
    # spaces everywhere work
    spaced = tmp_path / "my results" / "r 1.json"
    spaced.parent.mkdir()
    assert main(["evaluate", "--data-dir", str(ddir), "--json", str(spaced)]) == 0 and spaced.exists()


def test_names_cannot_reach_outside_the_data_directory(ddir, tmp_path, capsys):
    """Dataset, model and layer names a user types never become paths outside the data directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    before_out = _snapshot(outside)
    for argv in (["--model", "../../outside/x"], ["--model", "resnet20/../../x"], ["--layers", "../../outside"],
                 ["--dataset", "../outside"], ["--dataset", "cifar10/../../outside"], ["--model", "torchvision:../x"]):
        _fails_cleanly(capsys, ddir, ["evaluate", "--data-dir", str(ddir), *argv], "")
    assert _snapshot(outside) == before_out
    # every file the store writes lies under the data directory, named by hashes and slugs
    for p in ddir.rglob("*"):
        assert ddir in p.resolve().parents or p.resolve() == ddir


# ---------------------------------------------------------------------------------------------
# Lists, shares and huge counts: refused as they are parsed, before anything loads, with the flag


LISTS = {
    "seeds-infinite": (["sweep-size", "--seeds", "inf"], "--seeds inf"),
    "seeds-nan": (["sweep-size", "--seeds", "nan"], "--seeds nan"),
    "seeds-negative": (["sweep-size", "--seeds", "-1"], "--seeds -1: give comma-separated whole numbers from 0"),
    "seeds-huge": (["sweep-size", "--seeds", "1e30"], "--seeds 1e30"),
    "fractions-nan": (["sweep-size", "--fractions", "0,nan"], "--fractions 0,nan"),
    "early-fractions-infinite": (["early", "--fractions", "inf"], "--fractions inf"),
    "taus-above-one": (["early", "--taus", "2"], "--taus 2: give comma-separated thresholds from 0 to 1"),
    "taus-nan": (["early", "--taus", "0.9,nan"], "--taus 0.9,nan"),
    "k-infinite": (["topk", "--k", "inf"], "--k inf"),
    "k-huge": (["topk", "--k", "1e30"], "--k 1e30"),
    "epochs-infinite": (["keynet", "--epochs", "inf,1"], "--epochs inf,1"),
    "epochs-huge": (["keynet", "--epochs", "1e30,1"], "--epochs 1e30,1"),
    "fraction-nan": (["keynet", "--fraction", "nan"], "--fraction: 'nan' is not a finite number"),
    "fraction-above-one": (["keynet", "--fraction", "2"], "--fraction: 2 is not a share above 0 and at most 1"),
    "epsilons-nan": (["attack", "--attack", "fgsm", "--epsilons", "0,nan"], "--epsilons 0,nan"),
    "project-dim-huge": (["evaluate", "--project-dim", str(10**30)], "--project-dim: 1000"),
    "out-unwritable": (["sweep-size", "--out", "/proc/x.json"], "--out /proc/x.json: the folder /proc"),
    "json-unwritable": (["evaluate", "--json", "/proc/x.json"], "--json /proc/x.json: the folder /proc"),
}


@pytest.mark.parametrize("case", list(LISTS))
def test_lists_and_shares(case, ddir, capsys):
    argv, words = LISTS[case]
    if "/proc/" in words and not Path("/proc").is_dir():
        pytest.skip("needs /proc, a folder where nobody (root included) can create files")
    _fails_cleanly(capsys, ddir, [*argv, "--data-dir", str(ddir)], words)


# ---------------------------------------------------------------------------------------------
# The environment, the disk and the knowledge store's own files


def test_a_bad_feature_budget_is_one_sentence_and_breaks_no_import(ddir, capsys, monkeypatch):
    monkeypatch.setenv("CACHEVIZ_FEATURE_BUDGET_GB", "abc")
    _fails_cleanly(capsys, ddir, ["evaluate", "--data-dir", str(ddir)],
                   "CACHEVIZ_FEATURE_BUDGET_GB='abc' is not a number of gigabytes; set it to one, e.g. "
                   "CACHEVIZ_FEATURE_BUDGET_GB=16")
    # read at import it broke every page's import (the app's and the engine's modules alike)
    env = dict(os.environ, CACHEVIZ_FEATURE_BUDGET_GB="abc")
    p = subprocess.run([sys.executable, "-c", "import cacheviz.workspace, cacheviz.study, cacheviz.ui"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder whose disk has no space left: a 1 MB tmpfs filled up (as root, where mounting
    works), else atomic writes that fail as they would there."""
    from cacheviz import store

    d = tmp_path / "full"
    d.mkdir()
    mounted = (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None
               and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                                  capture_output=True).returncode == 0)
    if not mounted:
        def no_space(path):  # every atomic write (results, features, --json) goes through here
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(store, "_atomic_target", no_space)

    def fill():
        if mounted:
            with open(d / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC

    try:
        yield d, fill
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_full_disk_is_one_sentence_naming_it(ddir, full_disk, capsys):
    d, fill = full_disk
    # the data directory's disk: the digits network copied in first, so nothing trains
    data = d / "data"
    (data / "checkpoints").mkdir(parents=True)
    for ck in (ddir / "checkpoints").glob("digits-cnn*"):
        shutil.copy(ck, data / "checkpoints" / ck.name)
    fill()
    _fails_cleanly(capsys, data, ["evaluate", "--data-dir", str(data), "--train-limit", "200"],
                   f"the disk holding {data} is full; free space or give --data-dir on another disk")
    # the output's disk: the stored result is read from the data directory, the file cannot be written
    _fails_cleanly(capsys, ddir, ["evaluate", "--data-dir", str(ddir), "--json", str(d / "r.json")],
                   "is full; free space or give --json on another disk")
    assert not (d / "r.json").exists() and not list(d.rglob("*.tmp"))


def test_a_data_dir_below_a_file_is_one_sentence_for_every_command(ddir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for argv in (["store", "create"], ["store", "list"], ["sweep-size"], ["layers", "--model", "digits-cnn"]):
        _fails_cleanly(capsys, ddir, [*argv, "--data-dir", str(a_file / "sub")],
                       f"the folder cannot be created: {a_file} is a file, not a folder")


@pytest.fixture(scope="module")
def knowledge(ddir):
    """The digits setup's knowledge store (100 items), in the shared data directory."""
    assert main(["store", "create", "--data-dir", str(ddir), "--train-limit", "100"]) == 0
    return ["--data-dir", str(ddir), "--train-limit", "100"]


def test_store_commands_name_the_flag_typed_and_refuse_what_they_would_drop(ddir, knowledge, tmp_path, capsys):
    _fails_cleanly(capsys, ddir, ["store", "remove", "--class", "zebra", *knowledge],
                   "--class zebra: 'zebra' is not a class of this store")
    _fails_cleanly(capsys, ddir, ["store", "remove", "--ids", "1e30", *knowledge], "--ids 1e30")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(GOOD).save(folder / "a.png")
    # adding the folder alone dropped the file without a word
    _fails_cleanly(capsys, ddir, ["store", "add", "--label", "0", "--folder", str(folder), str(folder / "a.png"),
                                  *knowledge], "give image files or --folder, not both")


def test_a_store_with_a_damaged_meta_json_says_so(tmp_path, capsys):
    from cacheviz.kstore import stores_dir

    data = tmp_path / "data"
    meta = stores_dir(data) / "broken" / "meta.json"
    meta.parent.mkdir(parents=True)
    for damage in (b'{"setup": {"dataset": "dig', b"", b"[1, 2]"):
        meta.write_bytes(damage)
        # "create it", the old advice, stops at this same file
        _fails_cleanly(capsys, data, ["store", "list", "--store", "broken", "--data-dir", str(data)],
                       "knowledge store broken's meta.json")
        assert meta.read_bytes() == damage


def test_a_folder_dataset_with_empty_classes_is_evaluated_with_a_warning(ddir, tmp_path, capsys):
    root = _digit_tree(tmp_path / "tree", n=6)
    for f in (root / "train" / "3").iterdir():
        f.unlink()
    shutil.rmtree(root / "test" / "5")
    rc = main(["evaluate", "--dataset", f"folder:{root}", "--model", "digits-cnn", "--data-dir", str(ddir)])
    err = capsys.readouterr().err
    assert rc == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning:") and "no image files" in line]
    assert len(warned) == 1 and "3 in train/" in warned[0] and "5 in test/" in warned[0], err


def test_corpus_is_large_enough():
    n = (len(UPLOADS) + len(CHECKPOINTS) + len(FOLDERS) + 5 + len(NUMBERS) + len(SWEEP_NUMBERS) + 7 + 2
         + len(LISTS) + 2 + 2 + 4 + 3 + 3 + 1)
    assert n >= 50, n
