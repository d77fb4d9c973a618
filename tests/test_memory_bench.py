"""bench/memory.py counts what autograd keeps for backward: on a module small enough to count by hand, its
figures are the hand count (each storage once, freed branches left out, parameters left out)."""
import importlib.util
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("memory_bench", ROOT / "bench" / "memory.py")
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        h = self.linear(x)          # addmm keeps x (B x 4 floats)
        s = h * self.scale          # mul keeps h (B x 3 floats) and the parameter scale
        y = s.relu()                # relu keeps its output y (B x 3 floats)
        z = y * y                   # mul keeps y twice: the same storage
        gram = y.t() @ y            # mm keeps y.t() and y: views of that storage again
        (h * 2).exp()               # exp keeps its output, freed at once with this unused branch
        return z.sum() + gram.sum()


def test_kept_bytes_equal_a_hand_count():
    torch.manual_seed(0)
    model = Tiny()
    params = list(model.parameters())
    per_image_by_hand = (4 + 3 + 3) * 4   # rows of x, h and y, float32
    inside_linear_by_hand = 4 * 4         # x, kept by the addmm inside model.linear

    def kept_at(batch):
        kept, per_block, loss = memory.kept_bytes(lambda: model(torch.randn(batch, 4)), params, [model.linear])
        assert per_block == [inside_linear_by_hand * batch]
        loss.backward()   # what was kept is what backward needs
        return kept

    assert kept_at(5) == 5 * per_image_by_hand
    per_image, intercept = memory.per_image_and_intercept(kept_at, (3, 7))
    assert (per_image, intercept) == (per_image_by_hand, 0)
    # parameters not left out: scale (3 floats) counts too, once, whatever the batch
    kept, _, _ = memory.kept_bytes(lambda: model(torch.randn(5, 4)))
    assert kept == 5 * per_image_by_hand + 3 * 4


def test_static_bytes_count_weights_gradients_and_adamw_moments():
    model = Tiny()
    model.linear.bias.requires_grad_(False)   # frozen: its bytes once, no gradient, no moments
    assert memory.static_bytes(model) == (3 * 4 + 3) * 4 * 4 + 3 * 4
