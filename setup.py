"""Installs the CILF-CIAE reference implementation as flat top-level modules.

    pip install -e .            # the modules, ready to import or run
    pip install -e ".[test]"    # plus pytest and the reference CLIPs (OpenAI's, transformers, open_clip) for the parity tests

The CLIP BPE vocabulary ships beside clip_loader.py (found there in an editable install) and, for a
regular install, under <prefix>/share/cilf-ciae/, where clip_loader also looks.
Version ranges only: pin torch/torchvision for your CUDA build in the install command, not here.
"""
from setuptools import setup

setup(
    name="cilf-ciae",
    version="0.1.0",
    description="Reference implementation of CILF-CIAE: CLIP-driven image-language fusion for "
                "correcting inverse age estimation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    py_modules=["clip_loader", "linear_attention", "feedback", "model", "data", "train", "eval"],
    data_files=[("share/cilf-ciae", ["bpe_simple_vocab_16e6.txt.gz", "LICENSE-CLIP"])],
    install_requires=[
        "torch>=2.3",          # torch.amp.GradScaler(device)
        "torchvision>=0.18",
        "ftfy>=6.0",
        "regex>=2022.1",
        "tqdm>=4.60",
        "numpy>=1.22",
    ],
    extras_require={
        # clip-anytorch is OpenAI's CLIP code, used by the tests as the independent reference;
        # it imports pkg_resources, which setuptools>=81 no longer ships. transformers and
        # open_clip_torch write the Hugging Face and open_clip files clip_loader reads, and are the
        # references its features are compared with (tests/test_clip_formats.py).
        "test": ["pytest>=7", "clip-anytorch==2.6.0", "setuptools<81", "transformers>=4.40,<6",
                 "open_clip_torch>=2.24,<4", "safetensors>=0.4",
                 # the face detector, and the bundled photo (scikit-image's astronaut) it is tested on
                 "facenet-pytorch>=2.5,<2.6", "scikit-image>=0.19",
                 # OpenCV's affine warp: the independent reference of the aligned face crop
                 "opencv-python-headless>=4.8,<5"],
        "plot": ["matplotlib>=3.5"],
        # eval.py --detect-faces: MTCNN with its weights inside the wheel (2.6 pins an old torch)
        "faces": ["facenet-pytorch>=2.5,<2.6"],
    },
)
