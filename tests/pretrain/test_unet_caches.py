"""The UNet chain's caches. The segment cache (PRETRAIN.UNET.SEGMENT_CACHE): the grounding losses'
class masks, rendered once per corpus image and kept as label maps, give exactly the batches of
rendering every image again. The latent cache (PRETRAIN.UNET.LATENT_CACHE): the VAE's scaled
posterior means, encoded once, and made again for another corpus or another VAE."""

import json

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from pretrain_helpers import ZeroLatents

from spade.pretrain.corpus import Corpus, CorpusSpec, build_corpus
from spade.pretrain.unet import LatentCache, SegmentCache, unet_batches
from spade.pretrain.vae import to_vae_input

ENCODE = SimpleTokenizer().encode


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two 12-image corpora of different generator seeds."""
    root = tmp_path_factory.mktemp("segment_cache")
    out = []
    for seed in (0, 1):
        path = str(root / f"corpus_s{seed}")
        build_corpus(path, CorpusSpec(seed=seed, num_images=12, image_size=64, shard_size=12))
        out.append(Corpus(path))
    return out


def _same_segments(got, want):
    (masks, names), (masks_w, names_w) = got, want
    assert names == names_w
    assert masks.dtype == bool and masks.shape == masks_w.shape
    assert np.array_equal(masks, masks_w)


def test_cache_returns_the_rendered_segments_and_is_reused(tmp_path, corpora, monkeypatch):
    corpus = corpora[0]
    path = str(tmp_path / "cache" / "segments.npy")
    cache = SegmentCache(path, corpus)
    assert not cache.done.any()
    for i in range(len(corpus)):
        _same_segments(cache.segments(corpus, i), corpus.segments(i))
    assert cache.done.all()
    # the label map: 0 nowhere (stuff covers the background), k on the k-th segment
    masks, names = corpus.segments(3)
    label = np.asarray(cache.labels[3])
    assert label.min() >= 1 and label.max() == len(names)
    assert np.array_equal(label == 2, masks[1])
    assert list(cache.names[3][len(names) :]) == [-1] * (cache.MAX_SEGMENTS - len(names))
    del cache

    # a second process finds every image done: nothing is rendered again
    def no_render(i):
        raise AssertionError(f"image {i} rendered again")

    monkeypatch.setattr(corpus, "segments", no_render)
    again = SegmentCache(path, corpus)
    assert again.done.all()
    monkeypatch.undo()
    for i in range(len(corpus)):
        _same_segments(again.segments(corpus, i), corpus.segments(i))


def test_batches_are_the_same_with_and_without_the_cache(tmp_path, corpora):
    """Over three batches of 8 from 12 images (the cache fills, then serves), with the noun
    phrases of the pixel loss too."""
    corpus = corpora[0]
    cache = SegmentCache(str(tmp_path / "segments.npy"), corpus)
    kw = dict(seed=2, encode=ENCODE, pixel_phrase=True)
    plain = unet_batches(corpus, ZeroLatents(), 8, 0.25, **kw)
    cached = unet_batches(corpus, ZeroLatents(), 8, 0.25, segment_cache=cache, **kw)
    targets, captions = 0, []
    for _ in range(3):
        a, b = next(plain), next(cached)
        assert a["captions"] == b["captions"]
        captions += a["captions"]
        assert len(a["grounding"]) == len(b["grounding"]) == 8
        for items, items_c in zip(a["grounding"], b["grounding"]):
            assert len(items) == len(items_c)
            for (pos, mask, span), (pos_c, mask_c, span_c) in zip(items, items_c):
                assert pos == pos_c and span == span_c
                assert mask.dtype == mask_c.dtype == np.float32
                assert np.array_equal(mask, mask_c)
                targets += 1
    assert targets > 10
    # the images rendered into the cache: those drawn with a caption (dropped ones need no mask)
    stream = corpus.iter_indices(2, 0, 1)
    drawn = [next(stream)[0] for _ in captions]
    assert 0 < sum(c == "" for c in captions) < len(captions)
    assert set(np.flatnonzero(cache.done)) == {i for i, c in zip(drawn, captions) if c}


def test_cache_of_another_corpus_is_rebuilt(tmp_path, corpora):
    path = str(tmp_path / "segments.npy")
    first = SegmentCache(path, corpora[0])
    first.segments(corpora[0], 0)
    del first
    meta = json.loads(open(f"{path}.meta").read())
    assert meta["corpus"]["seed"] == 0
    other = SegmentCache(path, corpora[1])
    assert not other.done.any()
    _same_segments(other.segments(corpora[1], 0), corpora[1].segments(0))
    assert json.loads(open(f"{path}.meta").read())["corpus"]["seed"] == 1


def test_bad_cache_files_are_errors_naming_the_file(tmp_path, corpora):
    corpus = corpora[0]
    path = str(tmp_path / "segments.npy")
    SegmentCache(path, corpus)
    # a label file of another shape under a matching .meta (e.g. copied from elsewhere)
    np.save(path, np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"segments\.npy .*PRETRAIN\.UNET\.SEGMENT_CACHE.*holds"):
        SegmentCache(path, corpus)
    # a truncated .done file
    SegmentCache(str(tmp_path / "other.npy"), corpus)
    done = tmp_path / "other.npy.done"
    done.write_bytes(done.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"other\.npy\.done .*cannot be read"):
        SegmentCache(str(tmp_path / "other.npy"), corpus)


def _tiny_vae(seed):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    ).eval()


def test_latent_cache_encodes_once_and_knows_what_it_was_made_from(tmp_path, corpora, monkeypatch):
    corpus = corpora[0]
    vae = _tiny_vae(0)
    path = str(tmp_path / "latents.npy")
    cache = LatentCache(path, vae, 0.5, corpus)
    assert cache.latents.shape == (12, 4, 32, 32) and not cache.done.any()
    got = cache.get(corpus, [5, 2, 5])
    with torch.no_grad():
        want = vae.encode(to_vae_input(np.stack([corpus.image(i) for i in (5, 2)]))).latent_dist
    want = 0.5 * want.mean
    assert got.dtype == torch.float32 and got.shape == (3, 4, 32, 32)
    torch.testing.assert_close(got[0], want[0], atol=2e-3, rtol=2e-3)  # stored as float16
    torch.testing.assert_close(got[1], want[1], atol=2e-3, rtol=2e-3)
    assert torch.equal(got[0], got[2])
    assert list(np.flatnonzero(cache.done)) == [2, 5]
    del cache

    # the same corpus and VAE: the latents are read back, nothing is encoded again
    def no_encode(x):
        raise AssertionError("encoded again")

    monkeypatch.setattr(vae, "encode", no_encode)
    again = LatentCache(path, vae, 0.5, corpus)
    assert torch.equal(again.get(corpus, [5, 2, 5]), got)
    monkeypatch.undo()
    del again
    # another VAE (same shapes and scale, other weights), another scale, another corpus: rebuilt
    for other_vae, scale, other in ((_tiny_vae(1), 0.5, corpus), (vae, 0.7, corpus),
                                    (vae, 0.5, corpora[1])):  # fmt: skip
        rebuilt = LatentCache(path, other_vae, scale, other)
        assert not rebuilt.done.any()
        del rebuilt
    # a latent file of another shape under a matching .meta is an error naming the file and key
    LatentCache(path, vae, 0.5, corpus)
    np.save(path, np.zeros((12, 4, 16, 16), np.float16))
    with pytest.raises(ValueError, match=r"latents\.npy \(PRETRAIN\.UNET\.LATENT_CACHE\) holds"):
        LatentCache(path, vae, 0.5, corpus)


def test_latent_cache_fill_encodes_what_is_missing_once(tmp_path, corpora, monkeypatch):
    corpus = corpora[0]
    vae = _tiny_vae(0)
    path = str(tmp_path / "latents.npy")
    cache = LatentCache(path, vae, 0.5, corpus)
    cache.get(corpus, [3])
    calls = []
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x: calls.append(len(x)) or encode(x))
    # images 0-9 with 3 already cached, 5 at a time: 9 encoded in batches of 5 and 4
    assert cache.fill(corpus, range(10), batch_size=5) == 9
    assert calls == [5, 4]
    assert list(np.flatnonzero(cache.done)) == list(range(10))
    with torch.no_grad():
        want = (
            0.5
            * encode(to_vae_input(np.stack([corpus.image(i) for i in range(10)]))).latent_dist.mean
        )
    torch.testing.assert_close(cache.get(corpus, list(range(10))), want, atol=2e-3, rtol=2e-3)
    assert calls == [5, 4]  # get read them back
    # filled again, or with repeated indices: nothing more to encode
    assert cache.fill(corpus, [0, 0, 9, 9]) == 0 and calls == [5, 4]
    # and a new process sees the filled cache
    del cache
    assert LatentCache(path, vae, 0.5, corpus).done[:10].all()
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        LatentCache(path, vae, 0.5, corpus).fill(corpus, range(12), batch_size=0)
