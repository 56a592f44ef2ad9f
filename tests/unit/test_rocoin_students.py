"""RoCoIn's students (partitioner/zoo/students.py) and the teacher's cut (rocoin_plan.teacher_cut):
costs, shapes, the stored graph a board builds, and distillation that repeats itself."""
import pytest
import torch
from torch import nn

from robustdice.partitioner.core.rocoin_plan import family_options
from robustdice.partitioner.core.rocoin_runtime import teacher_cut
from robustdice.partitioner.errors import ModelError
from robustdice.partitioner.zoo.architecture import build, encode, trace
from robustdice.partitioner.zoo.models import build_model
from robustdice.partitioner.zoo.students import FAMILY, Student, blocks_for, count_macs, distill, shape_of, state_bytes


def test_macs_are_counted_per_image():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 10))
    assert count_macs(conv, (1, 8, 8)) == 64 * 4 * 9 + 256 * 10


@pytest.mark.parametrize("size, blocks", [(8, 2), (28, 3), (32, 4), (224, 5)])
def test_a_student_pools_while_the_image_keeps_four_pixels(size, blocks):
    assert blocks_for(size, size) == blocks


def test_the_family_has_known_costs_that_grow_with_width_and_depth():
    options = {o.name: o for o in family_options((1, 28, 28), 64, (1, 1))}
    assert len(options) == len(FAMILY) and all(name.endswith("-k64") for name in options)
    assert options["w16d1-k64"].flops < options["w16d2-k64"].flops < options["w32d2-k64"].flops
    assert options["w16d1-k64"].param_bytes < options["w32d1-k64"].param_bytes
    s = Student((1, 28, 28), 64, (1, 1), shape_of("w16d2-k64"))
    assert options["w16d2-k64"].param_bytes == state_bytes(s)
    assert s(torch.zeros(2, 1, 28, 28)).shape == (2, 64, 1, 1)


def test_a_student_runs_the_same_from_its_stored_graph():
    torch.manual_seed(0)
    s = Student((1, 8, 8), 5, (2, 2), shape_of("w8d2"), nonnegative=False).eval()
    stored = build(encode(trace(s, "student")))
    stored.load_state_dict(s.state_dict())
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(stored(x), s(x)) and s(x).shape == (3, 5, 2, 2)
    assert (s(x) < 0).any()   # no ReLU at the end when the teacher's features may be negative


@pytest.mark.parametrize("model, layer, shape", [("digits_cnn", "features.7", (128, 1, 1)),
                                                 ("fashion_vgg", "features.17", (128, 1, 1))])
def test_the_head_on_the_features_is_the_teacher(model, layer, shape):
    teacher = build_model(model, "none", seed=1)
    spec = (1, 8, 8) if model == "digits_cnn" else (1, 28, 28)
    cut = teacher_cut(teacher, spec)
    assert cut.layer == layer and cut.feature_shape == shape
    x = torch.randn(4, *spec)
    with torch.no_grad():
        torch.testing.assert_close(cut.head(cut.features(x)), teacher(x))
    # the head is torch.nn's layers only: a board builds it from the plan
    assert build(encode(cut.head))


def test_a_head_that_reads_around_the_last_convolution_is_refused():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.fc(torch.flatten(self.pool(self.b(h) + h), 1))

    with pytest.raises(ModelError, match="reads a from before it"):
        teacher_cut(Skip(), (1, 8, 8))


def test_distillation_repeats_itself_for_a_seed():
    teacher = build_model("digits_cnn", "DEFAULT")
    cut = teacher_cut(teacher, (1, 8, 8))
    images = torch.rand(96, 1, 8, 8)
    labels = torch.randint(0, 10, (96,))
    halves = [list(range(0, 128, 2)), list(range(1, 128, 2))]

    def run():
        torch.manual_seed(3)
        students = [Student((1, 8, 8), 64, (1, 1), shape_of("w8d1")) for _ in halves]
        return distill(students, halves, cut.features, cut.head, images, labels, seed=3, epochs=1,
                       feature_scale=torch.ones(128))

    a, b = run(), run()
    assert a.final_loss == b.final_loss
    for sa, sb in zip(a.students, b.students):
        for (ka, va), (kb, vb) in zip(sa.state_dict().items(), sb.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    assert not any(p.requires_grad for p in cut.head.parameters())   # the teacher's head stays frozen
