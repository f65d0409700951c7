"""Benchmark ``meld.prepare``: clips/s against a naive per-clip loop and against decoding alone.

    python bench/bench_prepare.py [--data ROOT] [--workers N] [--repeat N]

Every method handles the same clips (each CSV row's clip that exists, the undecodable one included),
after one untimed pass that reads every file, so that no method pays for the disk:

- ``meld.prepare``: ``meld.prepare.prepare`` into a fresh cache, in 1 process and with N worker
  processes, everything included (CSVs, scan, decode, log-mel, journal, consolidated stores, report)
  but the one-time start of the worker processes, printed on its own;
- ``naive loop``: what public MELD loaders do, one process, one clip at a time: decode the mp4
  (``torchaudio.load`` where it works, else PyAV to numpy and a channel mean), then
  ``librosa.feature.melspectrogram`` + ``power_to_db``, with CLARA's mel settings;
- ``decode only``: ``clara.audio_io.load_audio`` alone, in 1 process and in N: the floor of each.
  The closer prepare gets to it, the less it spends on anything but decoding.

Without ``--data`` it runs on the built-in demo (``meld.demo.ensure_demo``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.arguments import at_least  # noqa: E402
from clara.audio_io import AudioDecodeError, load_audio  # noqa: E402
from meld.clip_features import worker_context  # noqa: E402
from meld.demo import ensure_demo  # noqa: E402
from meld.feature_cache import AudioSettings, SplitStore, store_path  # noqa: E402
from meld.layout import find_layout  # noqa: E402
from meld.prepare import default_workers, prepare  # noqa: E402
from meld.records import load_splits  # noqa: E402

SETTINGS = AudioSettings()


def clip_paths(root: Path) -> dict[str, Path]:
    """key -> clip file, for every CSV row whose clip exists."""
    layout = find_layout(root)
    paths = {}
    for split, rows in load_splits(layout).items():
        for utt in rows:
            path = layout[split].clips / utt.clip_name
            if path.is_file():
                paths[utt.key] = path
    return paths


def decode_only(path: Path) -> int:
    try:
        return load_audio(path, max_seconds=SETTINGS.max_seconds).shape[0]
    except AudioDecodeError:
        return 0


def _decode_av_naively(path: Path) -> tuple[np.ndarray, int]:
    """The whole audio track as a mono float32 numpy array [N] and its rate, as loaders using PyAV do."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        planes = [frame.to_ndarray() for frame in container.decode(stream)]  # [C, n] each (planar AAC)
        return np.concatenate(planes, axis=1).mean(axis=0).astype(np.float32), stream.rate


def naive_mel(path: Path, decoder: str) -> np.ndarray | None:
    """One clip the way public MELD loaders do it: [80, T] in [-1, 1], or None if it does not decode."""
    import librosa

    try:
        if decoder == "torchaudio.load":
            import torchaudio

            wave, rate = torchaudio.load(str(path))
            wave = wave.mean(dim=0).numpy()
        else:
            wave, rate = _decode_av_naively(path)
    except Exception:  # noqa: BLE001 - a naive loader skips any clip that fails, whatever the error
        return None
    if rate != SETTINGS.sample_rate:
        wave = librosa.resample(wave, orig_sr=rate, target_sr=SETTINGS.sample_rate)
    wave = wave[: SETTINGS.max_samples]
    mel = librosa.feature.melspectrogram(y=wave, sr=SETTINGS.sample_rate, n_fft=SETTINGS.n_fft,
                                         hop_length=SETTINGS.hop_length, n_mels=SETTINGS.n_mels,
                                         fmin=SETTINGS.f_min, fmax=SETTINGS.f_max)
    return (librosa.power_to_db(mel, ref=np.max, top_db=SETTINGS.top_db) + 40.0) / 40.0


def pick_decoder(path: Path) -> str:
    """torchaudio.load if it can read mp4 here (torchaudio 2.9+ needs the torchcodec package), else PyAV."""
    try:
        import torchaudio

        torchaudio.load(str(path))
        return "torchaudio.load"
    except Exception:  # noqa: BLE001 - ImportError for torchcodec, RuntimeError for a missing backend
        return "PyAV"


def best_of(repeat: int, function) -> tuple[float, object]:
    """The shortest of ``repeat`` timed calls (the least disturbed by other load), and its result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="MELD root (default: the built-in demo)")
    parser.add_argument("--workers", type=at_least(1), default=default_workers(),
                        help="processes for prepare and the decode floor (default: one per CPU core)")
    parser.add_argument("--repeat", type=at_least(1), default=1, help="time each method this many times, keep the best")
    args = parser.parse_args(argv)

    root = Path(args.data) if args.data else ensure_demo(log=print)
    paths = clip_paths(root)
    for path in paths.values():  # into the page cache, untimed
        path.read_bytes()
    decoder = pick_decoder(next(iter(paths.values())))
    load = os.getloadavg()[0]

    # Worker processes are forked from one server process per run, which imports torch once; it is
    # started here, untimed, so that neither parallel method pays for it, and reported on its own.
    context = worker_context()

    def decode_pool() -> list[int]:
        with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
            return list(pool.map(decode_only, paths.values(), chunksize=8))

    def start_workers() -> None:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            pool.submit(abs, 0).result()

    start_up, _ = best_of(1, start_workers)

    def run_prepare(workers: int) -> dict:
        with tempfile.TemporaryDirectory() as cache:
            return prepare(root, cache, SETTINGS, workers=workers)

    n = len(paths)
    rows = []
    seconds, _ = best_of(args.repeat, lambda: [decode_only(path) for path in paths.values()])
    rows.append(("decode only (load_audio), 1 process", n, seconds))
    seconds, naive = best_of(args.repeat, lambda: {key: naive_mel(path, decoder) for key, path in paths.items()})
    rows.append((f"naive loop ({decoder} + librosa mel), 1 process", n, seconds))
    seconds, _ = best_of(args.repeat, lambda: run_prepare(1))
    rows.append(("meld.prepare, 1 process", n, seconds))
    seconds, _ = best_of(args.repeat, decode_pool)
    rows.append((f"decode only (load_audio), {args.workers} processes", n, seconds))
    seconds, _ = best_of(args.repeat, lambda: run_prepare(args.workers))
    rows.append((f"meld.prepare, {args.workers} workers", n, seconds))

    with tempfile.TemporaryDirectory() as cache:
        cache_dir = Path(prepare(root, cache, SETTINGS, workers=1)["cache_dir"])
        stores = {split: SplitStore(store_path(cache_dir, split)) for split in ("train", "dev", "test")}
        differences = [np.abs(stores[key.split("/")[0]].log_mel(key) - mel).max()
                       for key, mel in naive.items() if mel is not None and key in stores[key.split("/")[0]]]

    print(f"\nmachine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs, "
          f"load average {load:.1f} at the start, Python {platform.python_version()}")
    print(f"data: {root} ({n} clips); best of {args.repeat}; worker start-up (once per run, not in the table): "
          f"{start_up:.1f} s\n")
    width = max(len(row[0]) for row in rows)
    print(f"| {'method':<{width}} | clips | seconds | clips/s |")
    print(f"|{'-' * (width + 2)}|------:|--------:|--------:|")
    for method, clips, seconds in rows:
        print(f"| {method:<{width}} | {clips:>5} | {seconds:>7.2f} | {clips / seconds:>7.1f} |")
    if differences:
        print(f"\nprepare's cached log-mel vs the naive loop's: max |difference| {max(differences):.4f} "
              f"over {len(differences)} clips (float16 storage, values in [-1, 1])")


if __name__ == "__main__":
    main()
