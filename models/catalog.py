"""The model catalog: every model we know, described as data.

Pure data and lookups, no I/O. Call sites ask a `ModelSpec` (algorithm, scale, what the network sees,
receptive radius for tile overlap, cost) and never special-case a model by name. The OpenCV dnn_superres models'
files, sizes, checksums and URLs are those of ../shared/models/MANIFEST.md (each upstream repo pinned to a
commit). Our own models (`fast-xN`, `quality-xN`, trained by `python -m training`) are bundled: small ONNX files
in `models/weights/`, shipped in the package, never downloaded; their model cards are beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError

_FAMILIES = {
    "edsr": "EDSR",
    "fast": "superres-fast",
    "quality": "superres-quality",
    "espcn": "ESPCN",
    "fsrcnn": "FSRCNN",
    "fsrcnn-small": "FSRCNN-small",
    "lapsrn": "LapSRN",
}


@dataclass(frozen=True)
class ModelSpec:
    """One pretrained model file and what an engine needs to know to run it."""

    name: str  # catalog name, e.g. "fsrcnn-x3"
    algorithm: str  # OpenCV setModel name: "edsr" | "espcn" | "fsrcnn" (also FSRCNN-small) | "lapsrn"
    scale: int
    filename: str  # e.g. "FSRCNN_x3.pb"
    url: str  # pinned public URL (commit, not branch, so the bytes cannot change under us)
    size: int | None  # bytes; None where not known here (EDSR)
    sha256: str | None  # None for EDSR: only its git blob id is pinned upstream
    git_blob_sha1: str | None  # EDSR only: sha1 of b"blob <size>\0" + content, as `git hash-object` prints
    input_kind: str  # "y": network sees luma only (fsrcnn/espcn/lapsrn) | "bgr" (edsr)
    context_px: int  # LR pixels of context needed on each side (receptive radius): the minimum tile overlap
    macs_per_pixel: int  # approx multiply-accumulates per input pixel (DESIGN.md "Facts measured")
    fastest_cpu_engine: str = "opencv"  # measured (docs/benchmarks.md): what `--engine auto` takes on a CPU
    # onnxruntime on a CPU: its blocked (NCHWc) conv layouts, ORT_ENABLE_ALL. Measured per family: faster where
    # convs are 32+ channels wide (ESPCN, LapSRN, EDSR, quality), 1.3-1.6x slower on FSRCNN, whose 12- and
    # 56-channel convs alternate with PReLUs that force a reorder each side (docs/benchmarks.md)
    onnxruntime_blocked: bool = True
    license: str = "Apache-2.0"
    file_format: str = "pb"  # "pb" (TensorFlow GraphDef) | "onnx"
    bundled: bool = False  # shipped in the package (models/weights/), not downloaded: `url` is empty

    @property
    def family(self) -> str:
        """Display name of the architecture, e.g. "FSRCNN-small"."""
        return _FAMILIES[self.name.rsplit("-x", 1)[0]]


def conv_macs(layers: list[tuple[int, int, int]]) -> int:
    """MACs per input pixel of a network of convs at input resolution: (kernel taps, inputs per group, outputs)."""
    return sum(taps * cin * cout for taps, cin, cout in layers)


def fsrcnn_layers(scale: int, d: int = 56, s: int = 12, m: int = 4) -> list[tuple[int, int, int]]:
    """The GSoC FSRCNN graphs' convs (Saafke's export: the 9x9 deconv is a 1x1 conv to scale^2 + DepthToSpace)."""
    return [(25, 1, d), (1, d, s)] + [(9, s, s)] * m + [(1, s, d), (1, d, scale * scale)]


def own_layers(scale: int, channels: int, depth: int) -> list[tuple[int, int, int]]:
    """Our fast/quality graphs (training/arch.py): 3x3 head, `depth` 3x3 bodies, 3x3 tail to scale^2 sub-pixels,
    and the bicubic residual as two fixed convs: 5x1 to `scale` row phases, grouped 1x5 to scale^2 sub-pixels."""
    return ([(9, 1, channels)] + [(9, channels, channels)] * depth + [(9, channels, scale * scale)]
            + [(5, 1, scale), (5, 1, scale * scale)])


_SAAFKE_FSRCNN = "https://raw.githubusercontent.com/Saafke/FSRCNN_Tensorflow/6a4812c4ef1c4f5947d79beafa32a05a6eb4a94d/models"
_ESPCN = "https://raw.githubusercontent.com/fannymonori/TF-ESPCN/5c628eca82028161a53e1265cc3a5b571ab8625f/export"
_LAPSRN = "https://raw.githubusercontent.com/fannymonori/TF-LapSRN/fc51c90af1b5801a357abc919160d7ff4f24b997/export"
_EDSR = "https://raw.githubusercontent.com/Saafke/EDSR_Tensorflow/06c7bd65b0305c2955328f8f2721ea86c341f660/models"


def _spec(
    name: str,
    algorithm: str,
    scale: int,
    filename: str,
    base: str,
    *,
    size: int | None,
    sha256: str | None = None,
    git_blob_sha1: str | None = None,
    context_px: int,
    macs_per_pixel: int,
) -> ModelSpec:
    return ModelSpec(
        name=name,
        algorithm=algorithm,
        scale=scale,
        filename=filename,
        url=f"{base}/{filename}",
        size=size,
        sha256=sha256,
        git_blob_sha1=git_blob_sha1,
        input_kind="bgr" if algorithm == "edsr" else "y",
        context_px=context_px,
        macs_per_pixel=macs_per_pixel,
        # measured on 500x500 inputs (docs/benchmarks.md): onnxruntime 1.4-3.9x cv2.dnn on every family, EDSR-
        # structured graphs included (2.3x at 64 channels, 1.5x at EDSR's 256); torch at most 1.6x, and its
        # import costs a second
        fastest_cpu_engine="onnxruntime",
        onnxruntime_blocked=algorithm != "fsrcnn",
    )


_SPECS = [
    # EDSR (B32, F256): ~40 MB each, not in ../shared/models; only the git blob ids are pinned.
    _spec("edsr-x2", "edsr", 2, "EDSR_x2.pb", _EDSR, size=None,
          git_blob_sha1="7087df167eae8865b25b4f6032c819aacde25b8a", context_px=72, macs_per_pixel=38_400_000),
    _spec("edsr-x3", "edsr", 3, "EDSR_x3.pb", _EDSR, size=None,
          git_blob_sha1="9b9082ceca0d5a2fc6d6bae7456e2c7934b3aa4d", context_px=72, macs_per_pixel=38_400_000),
    _spec("edsr-x4", "edsr", 4, "EDSR_x4.pb", _EDSR, size=None,
          git_blob_sha1="09b872b26a6ba8d43abe433e65e65477ff8714ea", context_px=72, macs_per_pixel=38_400_000),
    # ESPCN
    _spec("espcn-x2", "espcn", 2, "ESPCN_x2.pb", _ESPCN, size=86446,
          sha256="59f77351e1d7c0057bf6fe088b4a8a07e42c468c8c8aebb674a6b4ea1823221d",
          context_px=6, macs_per_pixel=21_000),
    _spec("espcn-x3", "espcn", 3, "ESPCN_x3.pb", _ESPCN, size=92226,
          sha256="0e667db7a431d14c32568ed79bf21701a64df8b1d162e48ca1f8800affe2c2b3",
          context_px=6, macs_per_pixel=23_000),
    _spec("espcn-x4", "espcn", 4, "ESPCN_x4.pb", _ESPCN, size=100323,
          sha256="e403f06309229cf36009cd8fb0da032ba7643fae9f15cf94fe562e8edf8fef47",
          context_px=6, macs_per_pixel=25_000),
    # FSRCNN
    _spec("fsrcnn-x2", "fsrcnn", 2, "FSRCNN_x2.pb", _SAAFKE_FSRCNN, size=38973,
          sha256="366b33f0084c7b3f2bf6724f0a2c77bca94fcec9d7b6d72389d330073b380d5c",
          context_px=8, macs_per_pixel=conv_macs(fsrcnn_layers(2))),
    _spec("fsrcnn-x3", "fsrcnn", 3, "FSRCNN_x3.pb", _SAAFKE_FSRCNN, size=40093,
          sha256="efd38655a815908c6c8954db6052f128e76a735f1de657894c477d0dc0b64481",
          context_px=8, macs_per_pixel=conv_macs(fsrcnn_layers(3))),
    _spec("fsrcnn-x4", "fsrcnn", 4, "FSRCNN_x4.pb", _SAAFKE_FSRCNN, size=41661,
          sha256="5c68d18db561aed8ead4ffedf1b897ea615baaf60ebf6c35f8e641f8fa4a21bf",
          context_px=8, macs_per_pixel=conv_macs(fsrcnn_layers(4))),
    # FSRCNN-small: OpenCV knows it as "fsrcnn" ("fsrcnn-small" is rejected by upsample()).
    _spec("fsrcnn-small-x2", "fsrcnn", 2, "FSRCNN-small_x2.pb", _SAAFKE_FSRCNN, size=9595,
          sha256="429e4793d049c1ae16ddbbc322fd11c3c08831c0c20137390b4d098976a2b0d9",
          context_px=8, macs_per_pixel=conv_macs(fsrcnn_layers(2, 32, 5, 1))),
    _spec("fsrcnn-small-x3", "fsrcnn", 3, "FSRCNN-small_x3.pb", _SAAFKE_FSRCNN, size=10235,
          sha256="58e72d0c4231b8e754180e787d7348f45ae6230ee3c5af7dc12b558467f593f7",
          context_px=8, macs_per_pixel=conv_macs(fsrcnn_layers(3, 32, 5, 1))),
    _spec("fsrcnn-small-x4", "fsrcnn", 4, "FSRCNN-small_x4.pb", _SAAFKE_FSRCNN, size=11131,
          sha256="92a9f57c28494813b4dc073b51a300cb909401454d77541bcdc96b4d55901d02",
          context_px=8, macs_per_pixel=conv_macs(fsrcnn_layers(4, 32, 5, 1))),
    # LapSRN: the receptive field grows with the number of pyramid levels.
    _spec("lapsrn-x2", "lapsrn", 2, "LapSRN_x2.pb", _LAPSRN, size=1356253,
          sha256="f59c86e6835bbca646dbd81588f07820dfe3bd09e3702976ae2d90b5fc0f0b21",
          context_px=16, macs_per_pixel=340_000),
    _spec("lapsrn-x4", "lapsrn", 4, "LapSRN_x4.pb", _LAPSRN, size=2712798,
          sha256="d3e95c93cafae5ce5a8ed57ce9abf07f2de58da8c5d6d656b766774969835ee2",
          context_px=24, macs_per_pixel=1_700_000),
    _spec("lapsrn-x8", "lapsrn", 8, "LapSRN_x8.pb", _LAPSRN, size=4069183,
          sha256="a00211938b2b4c7d23691525a9267d9d0bbb345cdb9f38a7fc917414a5a1884f",
          context_px=32, macs_per_pixel=7_100_000),
]


# Our own models: (name, scale, channels, depth, size, sha256). The layer table is training/arch.py's
# ARCHITECTURES; tests/test_own_models.py checks that each file's layers and checksum are these.
_OWN = [
    ("fast-x2", 2, 14, 4, 33258, "c57e45b04e82e453c7d89da9e37b76df7068c5b9053d382ba50c0468922bf6b9"),
    ("fast-x3", 3, 14, 4, 35920, "e1c1b58b4d721a5cfd621220d1ac9f08183d03077b9a8528fa824761c7e64760"),
    ("fast-x4", 4, 13, 4, 35096, "7c275344f5a71fb615b537043b161104cfe49fb9929b3b7f01a5a1c2b3911ce2"),
    ("quality-x2", 2, 32, 8, 305865, "4bd0eb35c742d19e2d85d25575b8f18fea6fd76cf4263a434279336fecb159f8"),
    ("quality-x4", 4, 32, 8, 320021, "417fdfcd780a549a05d481e20b7560fd8a461f1d9865625a4c7dfe7f68268d88"),
    ("quality-x3", 3, 32, 8, 311767, "984abccd08f6e70fbe6d798f6ecb0f89baf1bbe0d333fc1b8e62174e9b28948e"),
]

_SPECS += [
    ModelSpec(
        name=name, algorithm=name.split("-")[0], scale=scale, filename=f"{name}.onnx", url="", size=size,
        sha256=sha256, git_blob_sha1=None, input_kind="y",
        context_px=depth + 2,  # one LR pixel per 3x3 conv (the residual's 5-tap kernels reach 2)
        macs_per_pixel=conv_macs(own_layers(scale, channels, depth)),
        # onnxruntime (their PRelu as plain ops, models/onnx_export.rewrite_onnx) 1.6x cv2.dnn: docs/benchmarks.md
        fastest_cpu_engine="onnxruntime", license="Apache-2.0 (weights: trained on T91 + BSDS200, research use)",
        file_format="onnx", bundled=True,
    )
    for name, scale, channels, depth, size, sha256 in _OWN
]

CATALOG: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def get_model(name: str) -> ModelSpec:
    """The spec for a catalog name; an unknown name is a ConfigError that lists the known ones."""
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise ConfigError(f"unknown model {name!r}; known models: {known}") from None
