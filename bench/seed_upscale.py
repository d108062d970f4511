"""The seed's script, as the baseline of the start-up and end-to-end benchmarks: plain cv2.dnn_superres, one
image at a time, read -> upsample -> write (PNG), nothing else.

    python bench/seed_upscale.py MODEL_FILE ALGORITHM SCALE OUT_DIR IMAGE...
"""

import sys
from pathlib import Path

import cv2


def main() -> None:
    model_file, algorithm, scale, out_dir, *images = sys.argv[1:]
    sr = cv2.dnn_superres.DnnSuperResImpl_create()
    sr.readModel(model_file)
    sr.setModel(algorithm, int(scale))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in images:
        image = cv2.imread(name)
        cv2.imwrite(str(out / (Path(name).stem + ".png")), sr.upsample(image))


if __name__ == "__main__":
    main()
