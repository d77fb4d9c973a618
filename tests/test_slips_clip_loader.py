"""Slips in clip_loader.py that the format and hostile-file tests could not see (found by a mutation review):
each test here fails when the rule is written wrong and passes on the correct code (bench/mutations.py
applies each slip and runs these tests).

4. Hugging Face configurations where the right and the wrong value differ: text and vision layer-norm eps
   that differ, rows where the end-of-text id is not the row's largest id, a config that leaves
   eos_token_id out (transformers' default then decides the pooling).
5. A pickle that names a module which merely starts with the letters "torch" (torchvision) is refused by
   the scan's own rule; a safetensors file that claims a longer header than the file holds is refused.
"""
import json
import pickle
import struct

import pytest
import torch

import clip_loader as cl

transformers = pytest.importorskip("transformers")
from test_clip_formats import hf_features, hf_model  # noqa: E402  (the tiny models the format tests use)


def rows_whose_end_is_not_the_largest_id():
    """Our tokenizer's rows, and rows with no end-of-text token whose largest id is not at position 0: there
    Hugging Face's rule (the first eos_token_id, position 0 when absent) and the largest-id rule differ."""
    ids = cl.tokenize(["a photo of a 37 year old person.", "a face"], context_length=16)
    odd = torch.zeros(2, 16, dtype=torch.long)
    odd[0, :4] = torch.tensor([320, 49406, 1125, 539])   # the start token in the middle, no end token
    odd[1, :3] = torch.tensor([539, 320, 40000])         # the largest id last, no end token
    return torch.cat([ids, odd])


def assert_matches(ours, model):
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = rows_whose_end_is_not_the_largest_id()
    image_ref, text_ref = hf_features(model, image, ids)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(image), image_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(ids), text_ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- 4 Hugging Face configurations

@pytest.mark.parametrize("vision_eps, text_eps", [(1e-5, 1e-2), (1e-2, 1e-6)])
def test_hugging_face_towers_keep_their_own_layer_norm_eps(tmp_path, vision_eps, text_eps):
    """Each tower's eps comes from its own config: swapped or shared, the features differ from transformers'."""
    model = hf_model(eps=(vision_eps, text_eps))
    model.save_pretrained(tmp_path)
    ours, _ = cl.load(tmp_path)
    assert_matches(ours, model)


def test_hugging_face_text_is_read_at_the_end_of_text_id_not_the_largest_id(tmp_path):
    model = hf_model(eos_token_id=49407)
    model.save_pretrained(tmp_path)
    ours, _ = cl.load(tmp_path)
    assert_matches(ours, model)


def test_hugging_face_config_without_eos_token_id_pools_as_transformers_does(tmp_path):
    """A config.json that leaves eos_token_id out: transformers' default (49407, the first end-of-text
    position) decides how the text is pooled, and the loader must pool the same way."""
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["text_config"]["eos_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = transformers.CLIPModel.from_pretrained(tmp_path).eval()   # as transformers reads that folder
    ours, _ = cl.load(tmp_path)
    assert_matches(ours, model)


def test_open_clip_eos_pooling_without_its_eos_id_is_refused():
    """open_clip's default eos_id is 2, which our tokenizer never writes: pool_type 'eos' without an eos_id
    cannot be served (a loader assuming 49407 would read the wrong position without a word)."""
    config = {"model_cfg": {"embed_dim": 48, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64,
                                                            "patch_size": 8},
                            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1,
                                         "layers": 1, "pool_type": "eos"}}}
    with pytest.raises(ValueError, match="pool_type"):
        cl.open_clip_settings(config)
    config["model_cfg"]["text_cfg"]["eos_id"] = 49407
    assert cl.open_clip_settings(config)[0]["text_eos_id"] == 49407


# --------------------------------------------------------------------------- 5 hostile files

def global_as_a_value(module, name):
    """{'a': <module.name>}: the global is only stored, never called, so no later check (the callables'
    allow-list at REDUCE) sees it: only the scan's module rule can refuse it."""
    return (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.BINUNICODE + struct.pack("<I", 1) + b"a"
            + pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.SETITEM + pickle.STOP)


@pytest.mark.parametrize("module", ["torchvision.ops", "torchaudio", "torch_evil", "__torch__evil"])
def test_module_allow_list_is_torch_dot_not_the_letters_torch(module):
    with pytest.raises(cl.CheckpointError, match=f"refers to {module}.x"):
        cl.scan_pickle(global_as_a_value(module, "x"))
    for allowed in ("torch", "torch._utils", "__torch__.Module", "collections"):
        cl.scan_pickle(global_as_a_value(allowed, "x"))


def test_safetensors_header_longer_than_the_file_is_refused(tmp_path):
    """A file that claims a 1,000-byte header and holds 2 bytes ("{}"): refused, not read as an empty file."""
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(cl.CheckpointError, match=r"the header length, exceed the file's 10 bytes"):
        cl.read_state_dict(str(path))
    path.write_bytes(struct.pack("<Q", 2) + b"{}")   # the same header, told truthfully: an empty file
    assert cl.read_state_dict(str(path)) == {}
