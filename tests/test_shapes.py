"""Static shapes for live steps: the bucket ladder and title cut by hand, the collation, padding that
changes no loss, gradient or metric, and a Scientific-shaped epoch that meets only a few shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from iisan.data.batches import CollateTrain, TrainBatch, without_padding_rows
from iisan.data.interactions import read_items
from iisan.data.run_data import load_data
from iisan.data.shapes import ShapeBuckets
from iisan.data.synthetic import SCIENTIFIC_LENGTHS, generate
from iisan.errors import ConfigError
from iisan.model.build import build_model
from iisan.model.tiny import vocabulary, write_bert
from iisan.train.plan import shape_buckets
from iisan.train.trainer import train

from ._batches import first_epoch

CPU = torch.device("cpu")


def test_bucket_ladder_by_hand():
    ladder = ShapeBuckets()  # growth 1/8 on multiples of 16
    # 16, 32, ... 144; then 144 * 1.125 = 162 -> 176; 176 * 1.125 = 198 -> 208; 208 -> 234 -> 240; ...
    assert [ladder.bucket(n) for n in (1, 16, 17, 139, 144, 145, 177, 209, 241, 276, 321)] == \
        [16, 16, 32, 144, 144, 176, 208, 240, 272, 320, 368]
    assert all(n <= ladder.bucket(n) <= 1.125 * n + 16 for n in range(1, 2000))
    assert ShapeBuckets(growth=0).bucket(139) == 139
    assert ShapeBuckets(growth=1.0).bucket(100) == 128  # 16, 32, 64, 128


def test_title_columns_by_hand():
    lengths = np.array([2, 5, 9, 17, 30, 0])
    cut = ShapeBuckets(title_lengths=lengths)
    assert cut.columns(np.array([0, 1])) == 8
    assert cut.columns(np.array([0, 1, 2])) == 16
    assert cut.columns(np.array([3])) == 24
    assert cut.columns(np.array([1, 4])) == 30  # 32 is past the table's 30 columns
    assert cut.columns(np.array([5])) == 8  # no token at all: still one multiple
    assert ShapeBuckets(title_lengths=lengths, title_multiple=0).columns(np.array([0])) is None
    assert ShapeBuckets().columns(np.array([0])) is None  # no text tower
    assert cut.pad(np.array([0, 3, 5])).tolist() == [0, 3, 5] + [0] * 13


def test_title_lengths_read_right_padding_only():
    from iisan.model.inputs import title_lengths

    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert title_lengths(mask).tolist() == [2, 4, 4, 0]  # a left-padded title is never cut


def test_config_rejects_bad_bucket_settings():
    with pytest.raises(ConfigError, match="item_bucket_growth=-0.5 must be >= 0"):
        from iisan.config import Config

        Config(item_bucket_growth=-0.5)
    with pytest.raises(ConfigError, match="title_multiple=-8 must be >= 0"):
        Config(title_multiple=-8)
    with pytest.raises(ConfigError, match="expected true or false"):
        Config(static_shapes="sometimes")


def test_collation_pads_items_and_cuts_titles():
    sequences = np.array([[0, 0, 3, 4, 3], [0, 5, 6, 7, 4], [0, 0, 0, 1, 2]])
    lengths = np.array([2, 5, 9, 3, 12, 4, 4, 20])
    buckets = ShapeBuckets(title_lengths=lengths)
    plain = CollateTrain(sequences, "items", None)([0, 1, 2])
    static = CollateTrain(sequences, "items", None, buckets)([0, 1, 2])
    assert plain.items.ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and not plain.items.encode_all
    assert static.items.ids.tolist() == list(range(8)) + [0] * 8 and static.items.encode_all
    assert static.items.title_columns == 24  # longest title of the batch: 20 tokens (item 7)
    assert torch.equal(static.items.ids[static.inverse].view(3, 5), torch.from_numpy(sequences))
    assert static.items.real.tolist() == list(range(1, 8))
    assert static.items.encoded_rows() == 16 and plain.items.encoded_rows() == 7
    back = without_padding_rows(static)
    assert back.items.ids.tolist() == plain.items.ids.tolist() and not back.items.encode_all
    assert back.items.title_columns == 24 and back.items.encoded_rows() == 7
    every = CollateTrain(sequences, "all", None, buckets)([0, 1, 2])  # the authors' way: every slot, no pad rows
    assert every.items.ids.tolist() == sequences.reshape(-1).tolist() and every.items.encode_all
    assert every.items.encoded_rows() == 15 and len(every.items.real) == 9


def test_cached_steps_and_the_switch_take_no_buckets(tiny_config, tiny_cache):
    cfg = tiny_config(cache_dir=tiny_cache)
    data = load_data(cfg)
    model, _ = build_model(cfg, data, CPU)
    assert shape_buckets(cfg, model) is None
    live, _ = build_model(cfg.replace(feed="live"), data, CPU)
    buckets = shape_buckets(cfg.replace(feed="live"), live)
    assert buckets.growth == 0.125 and buckets.title_multiple == 8 and buckets.title_tokens == 30
    assert buckets.title_lengths.shape == (data.num_items + 1,) and buckets.title_lengths.max() <= 30
    assert shape_buckets(cfg.replace(feed="live", static_shapes=False), live) is None


def loss_and_gradients(model, batch: TrainBatch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["iisan", "fft", "lora"])
def test_static_shapes_change_no_loss_and_no_gradient(tiny_config, method):
    """The same users' batches with and without static shapes: padding rows (encoded, then masked) and
    cut title columns leave the item embeddings, the loss and every gradient as they were. In eval mode:
    dropout would draw masks of other shapes."""
    cfg = tiny_config(method=method, feed="live")
    data = load_data(cfg)
    torch.manual_seed(0)
    model, pixels = build_model(cfg, data, CPU)
    model.eval()
    buckets = shape_buckets(cfg, model)
    sequences = data.train_sequences()
    pairs = zip(first_epoch(sequences, 0, pixels=pixels), first_epoch(sequences, 0, pixels=pixels, buckets=buckets))
    padded = 0
    for step, (plain, static) in zip(range(4), pairs):
        assert len(static.items.ids) == buckets.bucket(len(plain.items.ids)) >= len(plain.items.ids)
        padded += len(static.items.ids) > len(plain.items.ids)
        assert static.items.title_columns < cfg.title_tokens  # titles of about 10 tokens, cut to 16
        with torch.no_grad():  # every row a slot points at, padding's too, embeds as before
            used = len(plain.items.ids)
            torch.testing.assert_close(model.item_encoder(static.items)[:used], model.item_encoder(plain.items))
        loss, grads = loss_and_gradients(model, plain)
        padded_loss, padded_grads = loss_and_gradients(model, static)
        assert padded_loss == pytest.approx(loss, rel=1e-6), step
        assert padded_grads.keys() == grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            torch.testing.assert_close(padded_grads[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")
    assert padded >= 2  # most batches got padding rows


def test_dropout_inside_an_encoder_draws_other_masks_with_static_shapes(tiny_config):
    """Where training runs dropout inside an encoder (the baselines' BERT), padding rows and cut title columns
    change the shapes its masks are drawn for: a seeded step's loss is another draw than without static shapes
    (the same distribution, not the same bits: docs/performance.md, `--static-shapes`' help); without
    dropout it is the same loss."""
    cfg = tiny_config(method="fft", feed="live")
    data = load_data(cfg)
    torch.manual_seed(0)
    model, pixels = build_model(cfg, data, CPU)
    sequences = data.train_sequences()
    plain, static = (next(iter(first_epoch(sequences, 0, pixels=pixels, buckets=buckets)))
                     for buckets in (None, shape_buckets(cfg, model)))
    assert plain.items.title_columns is None and static.items.title_columns < cfg.title_tokens  # (None: all)

    def seeded_loss(batch: TrainBatch) -> float:
        torch.manual_seed(1)
        with torch.no_grad():
            return model(batch).item()

    model.train()
    assert seeded_loss(static) != pytest.approx(seeded_loss(plain), rel=1e-4)
    assert seeded_loss(plain) == seeded_loss(plain)  # (the seed alone decides a draw)
    model.eval()
    assert seeded_loss(static) == pytest.approx(seeded_loss(plain), rel=1e-6)


def test_static_shapes_change_no_metric(tiny_config):
    """A whole epoch of uncached IISAN with and without static shapes: the same losses and test metrics
    (frozen encoders run without dropout, SASRec's dropout draws masks of the same shapes). Matmuls of
    other row counts may round differently (torch 2.11's CPU kernels do, 2.13's do not here), and a
    near-tie between two items can then rank the other way for a user: the metrics agree to within a
    rank or two of the test's few users, far below what a padded row reaching the scores would move."""
    cfg = tiny_config(method="iisan", feed="live", epochs=1)
    a = train(cfg.replace(run_name="plain", static_shapes=False))
    b = train(cfg.replace(run_name="static"))
    assert not a["step"]["static_shapes"] and b["step"]["static_shapes"]
    assert b["epochs"][0]["loss"] == pytest.approx(a["epochs"][0]["loss"], rel=1e-5)
    assert b["test"] == pytest.approx(a["test"], abs=0.005)


class MatmulShapes(TorchDispatchMode):
    """Records the input shapes of every matmul and attention kernel run under it."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.endswith("mm") or "scaled_dot_product" in name:
            self.seen.add((name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def scientific(tmp_path_factory):
    """Scientific's users and sequence lengths (synthetic, no images) and a tiny text tower."""
    root = tmp_path_factory.mktemp("scientific")
    paths = generate(root, num_items=20314, num_topics=500, length_profile=SCIENTIFIC_LENGTHS, images=None)
    text = write_bert(root / "bert", vocabulary(read_items(paths["items"]).titles), hidden=8, layers=1, heads=1)
    return {"users": str(paths["users"]), "items": str(paths["items"]), "text_model": str(text)}


@pytest.mark.parametrize("batch_size", [32, 64])
def test_a_scientific_epoch_meets_few_shapes(scientific, tiny_config, batch_size):
    """The batches of a Scientific-shaped epoch, collated with static shapes, take at most 8 shapes
    (users, item rows, title columns), at a padding overhead under 10 % of the items. Run through a tiny
    text IISAN (item encoder, SASRec, loss), batches of one such shape run the same matmul and attention
    input shapes, and batches of different ones different shapes (the image tower's follow the same row
    count); without static shapes nearly every step meets new ones."""
    cfg = tiny_config(**scientific, towers="text", method="iisan", feed="live", batch_size=batch_size)
    data = load_data(cfg)
    model, _ = build_model(cfg, data, CPU)
    model.eval()
    buckets, sequences = shape_buckets(cfg, model), data.train_sequences()

    def matmul_shapes(batch: TrainBatch) -> frozenset:
        with torch.no_grad(), MatmulShapes() as recorder:
            model(batch)
        return frozenset(recorder.seen)

    static = list(first_epoch(sequences, cfg.seed, buckets=buckets, batch_size=batch_size))
    assert len(static) == -(-data.num_users // batch_size)
    by_shape: dict[tuple, list[TrainBatch]] = {}
    for batch in static:
        by_shape.setdefault((len(batch.seq), len(batch.items.ids), batch.items.title_columns), []).append(batch)
    assert len(by_shape) <= 8
    real = sum(len(b.items.real) for b in static)
    assert real < sum(b.items.encoded_rows() for b in static) < 1.10 * real
    # the distinct items a step encodes, as docs/performance.md quotes them (of 352 or 704 slots; seed 12345)
    assert cfg.seed == 12345 and round(real / len(static)) == {32: 139, 64: 276}[batch_size]
    recorded = {key: {matmul_shapes(b) for b in batches[:2]} for key, batches in by_shape.items()}
    assert all(len(shapes) == 1 for shapes in recorded.values())  # one shape key, one set of matmul shapes
    assert len(set.union(*recorded.values())) == len(by_shape)
    plain = [matmul_shapes(b) for b, _ in zip(first_epoch(sequences, cfg.seed, batch_size=batch_size), range(24))]
    assert len(set(plain)) > 12
