"""TorchServe end to end against the same model and preprocessing in-process, in one run.

Two models: the demo's (32 px, Fashion-MNIST PNGs) and, with --photo-224, a photo-sized
one: EfficientNet-Lite0 with its ImageNet weights (a package ships them) and a new
10-class head, exported at 224 px by the trainer's export code, fed 640x480 JPEGs of real
photos from scikit-image. Its head is untrained: only the time of the path is measured, and
the per-request overhead shows against a model whose compute is realistic.

For TorchScript and ONNX, batch 1 and batch 8 (TorchServe batching, 10 ms delay), at
concurrency 1, 8 and 32: throughput and p50/p99 latency of real PNG requests on
loopback, as a ratio to the in-process pipeline (decode -> preprocess -> infer ->
postprocess, same functions the handler calls). Then the capture store's overhead: the
same ONNX batch-8 server with every request captured against none captured.
The load generator runs on the same machine as the server: on a 2-core box it takes
CPU from the server, which the ratios include.

    python -m bench.serving [--version-dir model_store/fashion/v1 --seconds 8]
    python -m bench.serving --photo-224 [--seconds 8]
    python -m bench.serving --spinning-ab   # ORT spin-waiting on vs off, in-process
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from visionloop.core.manifest import ModelManifest
from visionloop.core.model_store import ModelStore
from visionloop.serving import server
from visionloop.serving.archive import package
from visionloop.serving.backends import OnnxBackend, load_backend
from visionloop.serving.capture import CapturePolicy
from visionloop.serving.handler import ServingConfig
from visionloop.serving.inference import decode, postprocess, preprocess_batch
from visionloop.trainer import fashion_mnist

NO_CAPTURE = CapturePolicy(max_confidence=None)
CAPTURE_ALL = CapturePolicy(max_confidence=1.01, per_minute=1_000_000)


def real_pngs(count: int) -> list[bytes]:
    import io

    from PIL import Image

    images = fashion_mnist.read_idx(fashion_mnist.DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")
    out = []
    for array in images[:count]:
        buffer = io.BytesIO()
        Image.fromarray(array, mode="L").save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field",
          "immunohistochemistry", "retina", "cat", "colorwheel", "logo", "page")


def photo_jpegs(count: int, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    """Real photos (scikit-image ships them), resized to an upload-sized JPEG each, with a
    different crop per copy so no two bodies are the same bytes."""
    import io

    from PIL import Image
    from skimage import data as skdata

    photos = [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in PHOTOS
              if hasattr(skdata, name)]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        shift = i // len(photos)
        cropped = photo.crop((shift % 17, shift % 13, photo.width - shift % 11,
                              photo.height - shift % 7))
        buffer = io.BytesIO()
        cropped.resize(size).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def photo_model(root: Path, image_size: int = 224, classes: int = 10) -> Path:
    """A version directory the handler can serve: Lite0 with ImageNet weights and a new
    head, exported (TorchScript, ONNX, parity-checked) at image_size."""
    from visionloop.core.fsutil import sha256_file
    from visionloop.core.manifest import Artifact, Preprocessing
    from visionloop.trainer.export import export_all
    from visionloop.trainer.models import LITE0, build_model

    torch.manual_seed(0)
    built = build_model(LITE0, classes, "DEFAULT")
    version_dir = root / "photo224" / "v1"
    version_dir.mkdir(parents=True)
    pre = Preprocessing(image_size, round(image_size * 256 / 224), built.mean, built.std)
    images = [decode(b) for b in photo_jpegs(8)]
    batch = preprocess_batch(images, photo_manifest(pre, classes))
    exported = export_all(built.model.eval(), batch, version_dir, temperature=1.0)
    artifacts = {fmt: Artifact(file, fmt, sha256_file(version_dir / file), diff)
                 for fmt, (file, diff) in exported.items()}
    manifest = photo_manifest(pre, classes, artifacts)
    manifest.save(version_dir)
    return version_dir


def photo_manifest(pre, classes: int, artifacts: dict | None = None) -> ModelManifest:
    """What the handler reads from the version directory."""
    return ModelManifest(name="photo224", version="v1", arch="efficientnet_lite0",
                         classes=tuple(f"class_{i}" for i in range(classes)), preprocessing=pre,
                         temperature=1.0, artifacts=artifacts or {})


def in_process(version_dir: Path, artifact: str, bodies: list[bytes], batch: int,
               seconds: float, backend=None) -> float:
    manifest = ModelManifest.load(version_dir)
    backend = backend or load_backend(version_dir / artifact, gpu_id=None)
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        chunk = [bodies[(i + k) % len(bodies)] for k in range(batch)]
        images = [decode(b) for b in chunk]
        postprocess(backend(preprocess_batch(images, manifest)), manifest)
        done, i = done + batch, i + batch
    return done / (time.perf_counter() - start)


def spinning_ab(version_dir: Path, bodies: list[bytes], seconds: float) -> None:
    """In-process ONNX batch 8 with ORT's spin-waiting on and off, alternating."""
    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(2):
        for spinning in runs:
            backend = OnnxBackend(version_dir / "model.onnx", None, allow_spinning=spinning)
            runs[spinning].append(in_process(version_dir, "", bodies, 8, seconds, backend))
    on, off = statistics.median(runs[True]), statistics.median(runs[False])
    print(f"in-process ONNX batch 8, ORT spin-waiting on {[round(r) for r in runs[True]]} vs "
          f"off {[round(r) for r in runs[False]]} img/s: off/on = {off / on:.2f}x")


def load(cfg: server.ServerConfig, model: str, bodies: list[bytes], concurrency: int,
         seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    stop_at = time.perf_counter() + seconds
    lock = threading.Lock()

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", cfg.inference_port, timeout=60)
        i = offset
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            conn.request("POST", f"/predictions/{model}", body=bodies[i % len(bodies)],
                         headers={"Content-Type": "application/octet-stream"})
            response = conn.getresponse()
            response.read()
            with lock:
                latencies.append(time.perf_counter() - sent)
                errors[0] += response.status != 200
            i += concurrency
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"img_s": len(latencies) / elapsed, "errors": errors[0],
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, default=None,
                        help="default: the latest version of 'fashion' in model_store/")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--capture-only", action="store_true",
                        help="measure only the capture overhead")
    parser.add_argument("--spinning-ab", action="store_true",
                        help="only in-process ONNX with ORT spin-waiting on vs off")
    parser.add_argument("--photo-224", action="store_true",
                        help="the photo-sized model (Lite0 at 224 px, real photos as JPEG)")
    args = parser.parse_args()
    artifacts = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        home = Path(tmp)
        if args.photo_224:
            version_dir = photo_model(home / "store")
            bodies = photo_jpegs(min(args.images, 64))
        else:
            version_dir = args.version_dir or ModelStore("model_store").version_dir(
                "fashion", ModelStore("model_store").latest_version("fashion") or "v1")
            bodies = real_pngs(args.images)
        if args.spinning_ab:
            spinning_ab(version_dir, bodies, args.seconds)
            return
        cfg = server.ServerConfig(home=home, model_store=home / "mars",
                                  capture_dir=home / "captures", inference_port=18480,
                                  management_port=18481, metrics_port=18482,
                                  grpc_inference_port=18483, grpc_management_port=18484)
        models = {}  # name -> flat .mar file (TorchServe does not load from subfolders)
        for backend in artifacts:
            for batch in (1, 8):
                mar = package(version_dir, cfg.model_store, backend, batch_size=batch,
                              serving=ServingConfig(capture=NO_CAPTURE))
                name = f"{backend}_b{batch}"
                models[name] = mar.rename(mar.with_name(f"{name}.mar")).name
        for label, policy in (("capture_all", CAPTURE_ALL), ("capture_none", NO_CAPTURE)):
            mar = package(version_dir, cfg.model_store, "onnx", batch_size=8,
                          serving=ServingConfig(capture=policy))
            models[label] = mar.rename(mar.with_name(f"{label}.mar")).name
        server.start(cfg, models, timeout=300)
        try:
            if not args.capture_only:
                report(cfg, version_dir, artifacts, bodies, args.seconds)
            capture_overhead(cfg, bodies, args.seconds)
        finally:
            server.stop(cfg)


def report(cfg: server.ServerConfig, version_dir: Path, artifacts: dict[str, str],
           bodies: list[bytes], seconds: float) -> None:
    pre = ModelManifest.load(version_dir).preprocessing
    print(f"model {version_dir} ({pre.image_size} px), {len(bodies)} real images "
          f"(~{statistics.mean(len(b) for b in bodies) / 1024:.1f} KB each), {seconds:.0f}s per "
          f"cell, {torch.get_num_threads()} torch threads, client on the same machine")
    print("| backend | batch | in-process img/s | concurrency | served img/s | ratio | "
          "p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend, artifact in artifacts.items():
        for batch in (1, 8):
            base = in_process(version_dir, artifact, bodies, batch, seconds)
            for concurrency in (1, 8, 32):
                r = load(cfg, f"{backend}_b{batch}", bodies, concurrency, seconds)
                print(f"| {backend} | {batch} | {base:.0f} | {concurrency} | {r['img_s']:.0f} | "
                      f"{r['img_s'] / base:.2f}x | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                      f"{r['errors']} |")


def capture_overhead(cfg: server.ServerConfig, bodies: list[bytes], seconds: float) -> None:
    runs: dict[str, list[float]] = {"capture_none": [], "capture_all": []}
    for _ in range(3):  # alternate, so drift hits both
        for label in runs:
            runs[label].append(load(cfg, label, bodies, 8, seconds)["img_s"])
    off, on = statistics.median(runs["capture_none"]), statistics.median(runs["capture_all"])
    print(f"\ncapture overhead (ONNX, batch 8, concurrency 8, every request captured vs none, "
          f"median of 3): {off:.0f} -> {on:.0f} img/s = {100 * (1 - on / off):.1f}% "
          f"(goal < 5%)")


if __name__ == "__main__":
    main()
