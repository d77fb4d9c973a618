"""What a wrong guess costs: open_clip GELU weights read with OpenAI's QuickGELU, and heads of 64 where
the model has wider ones, against open_clip's own features (random weights, open_clip's initialisation).

    python bench/clip_activation.py      # a 2-layer toy and the ViT-B/16 shape, CPU, under a minute

Random weights understate the error of trained ones (larger activations); no trained weights are
available here. Needs the test extra (pip install -e ".[test]") for open_clip.
"""
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_loader  # noqa: E402

warnings.filterwarnings("ignore")  # open_clip's and clip_loader's notices; the numbers are the point
import open_clip  # noqa: E402

MODELS = {  # name: (vision_cfg, text_cfg, embed_dim), all GELU like every laion2b / datacomp tag
    "2-layer toy": (dict(image_size=32, layers=2, width=64, patch_size=8),
                    dict(context_length=16, width=64, heads=1, layers=2), 64),
    "ViT-B/16 shape": (dict(image_size=224, layers=12, width=768, patch_size=16),
                       dict(context_length=77, width=512, heads=8, layers=12), 512),
    "toy, heads of 32": (dict(image_size=32, layers=2, width=128, head_width=32, patch_size=8),
                         dict(context_length=16, width=64, heads=1, layers=2), 64),
}


def main():
    torch.manual_seed(0)
    print("| model | read as | image: max abs error (max abs feature) | text: max abs error (max abs feature) |")
    print("|---|---|---|---|")
    for name, (vision, text, embed_dim) in MODELS.items():
        ref = open_clip.model.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=False).eval()
        r = vision["image_size"]
        image = torch.randn(2, 3, r, r)
        ids = clip_loader.tokenize(["a photo of a 37 year old person.", "a face"], context_length=text["context_length"])
        right = clip_loader.build_model(ref.state_dict(), activation="gelu",
                                        vision_head_width=vision.get("head_width", 64))
        wrong = clip_loader.build_model(ref.state_dict())  # OpenAI's assumption: QuickGELU, heads of 64
        with torch.no_grad():
            image_ref, text_ref = ref.encode_image(image), ref.encode_text(ids)
            for label, model in (("as described", right), ("OpenAI's guess", wrong)):
                di = (model.encode_image(image) - image_ref).abs().max()
                dt = (model.encode_text(ids) - text_ref).abs().max()
                print(f"| {name} | {label} | {di:.2g} ({image_ref.abs().max():.2g}) | {dt:.2g} ({text_ref.abs().max():.2g}) |")


if __name__ == "__main__":
    main()
