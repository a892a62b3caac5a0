"""A virtualenv with the real WSInfer client, made once and kept under ``.cache/`` (git-ignored).

Why a separate environment: WSInfer is a client of the platform's exports, not a dependency of the
platform. Its own pins would clash (``tiffslide`` 3, which wsinfer's ``tiffslide>=2.2`` picks, needs
``tifffile>=2025.5.21`` and ``zarr>=3``; large-image here needs ``tifffile==2025.5.10`` and ``zarr<3``), so the
environment gets ``tiffslide`` 2.5.1 (which fits both) and no resolver run: the few packages below are
installed with ``--no-deps``, and everything else (torch, torchvision, OpenSlide, numpy, pandas...) is seen
from the project's own virtualenv through a ``.pth`` file, so torch is not installed a second time.
``--system-site-packages`` would not do: a venv made from a venv's Python sees the base interpreter's
site-packages, not the project venv's.

The environment is keyed by the pins and the project venv's location; a half-made one (no marker file)
is rebuilt. Installation reads the configured package index (the local registry on CI).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PINS = ("wsinfer==0.6.1", "wsinfer-zoo==0.6.3", "tiffslide==2.5.1", "h5py==3.16.0")
MARKER = "histoloop-ready"


def _key() -> str:
    parts = [*PINS, sys.version, *site.getsitepackages()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def env_dir() -> Path:
    return Path(os.environ.get("WSINFER_ENV_DIR", REPO_ROOT / ".cache" / f"wsinfer-{_key()}"))


def wsinfer_executable() -> Path:
    """The ``wsinfer`` command of the cached environment, creating the environment when missing."""
    target = env_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes build it once
        if not (target / MARKER).is_file():
            _create(target)
    return target / "bin" / "wsinfer"


def _create(target: Path) -> None:
    """Made where it stays (a venv's scripts name their interpreter by absolute path); the marker last."""
    shutil.rmtree(target, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
        python = str(target / "bin" / "python")
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # Read after the environment's own site-packages: what is installed here wins over the project's.
        Path(purelib, "histoloop-project-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--disable-pip-version-check",
             "--no-input", "--quiet", *PINS],
            check=True,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as home:
            subprocess.run(
                [str(target / "bin" / "wsinfer"), "--version"],
                check=True,
                capture_output=True,
                env=offline_env(Path(home)),
            )
        (target / MARKER).write_text("\n".join(PINS) + "\n")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def offline_env(home: Path) -> dict[str, str]:
    """Environment for running ``wsinfer`` with no network: at import it fetches the model zoo's registry from
    the Hugging Face hub into ``~/.wsinfer-zoo`` (its ``--model`` choices); an empty registry there and
    ``HF_HUB_OFFLINE`` make it read that file instead. ``WSINFER_FORCE_CPU`` keeps it on the CPU, where the
    platform's own scores were computed."""
    registry = home / ".wsinfer-zoo" / "wsinfer-zoo-registry.json"
    registry.parent.mkdir(parents=True, exist_ok=True)
    registry.write_text('{"models": {}}\n')
    env = dict(os.environ)
    env.update({"HOME": str(home), "HF_HUB_OFFLINE": "1", "WSINFER_FORCE_CPU": "1", "TQDM_DISABLE": "1"})
    for name in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env
