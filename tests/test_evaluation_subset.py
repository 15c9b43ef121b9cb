"""Evaluation subsets are a fixed seeded random sample, not the first images on disk (issue 11 item 15)."""
import torch

from kohonen_vae.data import evaluation_indices, evaluation_subset, load_splits


def test_a_class_sorted_set_is_sampled_across_classes_reproducibly():
    labels = torch.arange(10).repeat_interleave(100)  # a folder dataset sorted by class: 10 x 100 images
    idx = evaluation_indices(1000, 256, seed=0)
    assert idx is not None and len(idx) == 256 and len(set(idx.tolist())) == 256
    assert torch.equal(idx, idx.sort().values)
    assert set(labels[idx].tolist()) == set(range(10))  # the first 256 would hold classes 0-2 only
    assert set(labels[:256].tolist()) == {0, 1, 2}
    assert torch.equal(idx, evaluation_indices(1000, 256, seed=0))  # the same for every run of the split seed
    assert not torch.equal(idx, evaluation_indices(1000, 256, seed=1))
    assert evaluation_indices(1000, None, 0) is None and evaluation_indices(1000, 1000, 0) is None


def test_training_and_reports_evaluate_the_same_images():
    from kohonen_vae.report import evaluation_images

    splits = load_splits("sample")
    config = {"data": {"name": "sample", "val_max_images": 100, "split_seed": 0}}
    expected = evaluation_subset(splits.val.images, 100, seed=0)
    assert torch.equal(evaluation_images(config), expected)
    assert not torch.equal(expected, splits.val.images[:100])
