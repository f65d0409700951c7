"""The shipped recipe for a tiny CLARA pretrained on the MELD demo: what ``python -m meld.zeroshot`` uses
when given no checkpoint.

    checkpoint = ensure_demo_clara()   # a meld-clara checkpoint folder, for clara.checkpoint.load_checkpoint

The first call builds the demo (``meld.demo``) and its feature cache (``meld.prepare``), exports the
train clips with captions (``meld.pretrain_manifest``, dev as held-out retrieval) and runs clara.pretrain's
training function with ``configs/pretrain/meld_demo.yaml``: a few minutes on 2 CPU cores. The result is
kept in ``$MELD_CLARA_CACHE`` (or ~/.cache/meld-clara) under ``clara/meld-demo-<key>``, the key hashing
the recipe, its overrides, the captions, the audio settings and the demo itself; later calls return it
at once. It is built in a hidden folder (``clara/.meld-demo-<key>.partial``) and renamed into place,
under a lock, so an interrupted or concurrent build never leaves a half-made checkpoint behind; an
interrupted build resumes from that folder's last saved step on the next call.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from clara import config as config_lib
from clara.augment import check_config
from clara.io_utils import locked, user_cache_dir
from clara.model_config import CONFIG_ROOT
from clara.pretrain import PretrainConfig, run
from meld.captions import load_captions
from meld.demo import MANIFEST_NAME, ensure_demo, read_manifest
from meld.errors import MeldDataError
from meld.feature_cache import AudioSettings
from meld.prepare import prepare
from meld.pretrain_manifest import export_manifest

RECIPE = CONFIG_ROOT / "pretrain" / "meld_demo.yaml"
RECIPE_VERSION = 1  # bump when this module changes what it builds
MODEL_DIR = "model"


def cache_base() -> Path:
    return user_cache_dir()


def recipe_key(config: PretrainConfig, root: Path, captions_path: str | Path | None) -> str:
    """12 hex digits of SHA-256 over everything that decides the weights."""
    demo = read_manifest(root.parent)
    if demo is None:
        raise MeldDataError(f"{root.parent}: no {MANIFEST_NAME}; the recipe pretrains on a demo made by meld.demo")
    blob = json.dumps({
        "version": RECIPE_VERSION,
        "recipe": config_lib.to_dict(config),
        "captions": config_lib.to_dict(load_captions(captions_path)),
        "audio": AudioSettings().key(),
        "demo": {name: demo[name] for name in ("version", "size", "seed")},
        "root": str(root.resolve()),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_demo_clara(
    *,
    data_root: str | Path | None = None,
    overrides: Sequence[str] = (),
    captions: str | Path | None = None,
    cache_root: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The checkpoint folder of the recipe on ``data_root`` (a demo's MELD.Raw; default: the built-in demo).

    ``overrides`` are clara.pretrain ``key=value`` settings on top of the recipe (e.g. ``train.steps=5``);
    ``cache_root`` is meld.prepare's feature cache for ``data_root`` (default: its default one).
    """
    log = log or (lambda message: None)
    root = Path(data_root) if data_root is not None else ensure_demo(log=log)
    config = config_lib.load(PretrainConfig, RECIPE, overrides)
    check_config(config.augment)
    key = recipe_key(config, root, captions)
    home = cache_base() / "clara"
    final = home / f"meld-demo-{key}"
    if (final / MODEL_DIR).is_dir():
        return final / MODEL_DIR
    home.mkdir(parents=True, exist_ok=True)
    with locked(home / ".meld-demo.lock"):  # a concurrent build of the same key finishes first
        if (final / MODEL_DIR).is_dir():
            return final / MODEL_DIR
        log(f"pretraining the tiny demo CLARA on {root} (first run only; cached in {final})")
        prepare(root, cache_root)  # reuses whatever is cached already; its report names the clips to skip
        # One staging folder per key, kept when the build stops: its checkpoint.pt lets the next call
        # resume the pretraining where an interrupted one left off (the lock keeps builds apart).
        staging = home / f".meld-demo-{key}.partial"
        staging.mkdir(exist_ok=True)
        train = export_manifest(root, staging / "train.jsonl", templates=captions, splits=("train",),
                                cache_root=cache_root)
        held_out = export_manifest(root, staging / "dev.jsonl", templates=captions, splits=("dev",),
                                   cache_root=cache_root)
        data = replace(config.data, train=str(train.path), eval=str(held_out.path))
        run(replace(config, data=data, train=replace(config.train, out_dir=str(staging))))
        os.replace(staging, final)
        log(f"the demo CLARA is ready: {final / MODEL_DIR}")
    return final / MODEL_DIR
