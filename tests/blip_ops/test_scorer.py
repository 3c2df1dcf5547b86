"""Fidelity: the one-vision-pass scorer equals BlipForImageTextRetrieval on each single pair."""

import numpy as np
import pytest
import torch
from PIL import Image

from blip_ops.images import decode_rgb
from blip_ops.scorer import BlipScorer
from tests.conftest import image_bytes
from tests.reference import itm_reference

TEXTS = [
    "a red circle",
    "a blue square on a white background with stripes",
    "photo",
    "a green triangle and a yellow cup on a table",
    "Zürich café 🙂 مرحبا <b>bold</b>",
    "a small dog",
]


def _images():
    rng = np.random.RandomState(0)
    out = []
    for index in range(len(TEXTS)):
        array = (rng.rand(20 + 9 * index, 30 + 5 * index, 3) * 255).astype(np.uint8)
        out.append(image_bytes(Image.fromarray(array), "PNG"))
    return out


@pytest.fixture(scope="module")
def reference(tiny_itm):
    return itm_reference(tiny_itm)


@pytest.fixture(scope="module")
def scorer(tiny_itm):
    return BlipScorer.from_pretrained(tiny_itm, device="cpu", max_text_tokens=35)


def _resized(scorer, data):
    return scorer.images.resize(decode_rgb(data))


def test_batch_scores_equal_single_pair_reference(scorer, reference):
    images = _images()
    itc, itm, truncated = scorer.score([_resized(scorer, d) for d in images], TEXTS)
    assert itc.dtype == np.float32 and itm.dtype == np.float32
    assert not truncated.any()
    for i, (data, text) in enumerate(zip(images, TEXTS)):
        ref_itc, ref_itm = reference(data, text)
        assert itc[i] == pytest.approx(ref_itc, abs=1e-3)
        assert itm[i] == pytest.approx(ref_itm, abs=1e-3)
    # The tiny model must tell rows apart, or the comparison above proves little.
    assert np.ptp(itc) > 0.05 and np.ptp(itm) > 0.01


def test_batching_and_order_do_not_change_a_rows_scores(scorer):
    images = [_resized(scorer, d) for d in _images()]
    itc, itm, _ = scorer.score(images, TEXTS)
    order = [5, 2, 0, 4, 1, 3]
    itc_r, itm_r, _ = scorer.score([images[i] for i in order], [TEXTS[i] for i in order])
    np.testing.assert_allclose(itc_r, itc[order], atol=1e-5)
    np.testing.assert_allclose(itm_r, itm[order], atol=1e-5)
    for i in range(len(images)):
        one_itc, one_itm, _ = scorer.score([images[i]], [TEXTS[i]])
        assert one_itc[0] == pytest.approx(itc[i], abs=1e-5)
        assert one_itm[0] == pytest.approx(itm[i], abs=1e-5)


def test_vision_encoder_runs_once_per_batch(scorer):
    calls = []
    handle = scorer.model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        scorer.score([_resized(scorer, d) for d in _images()], TEXTS)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_long_text_is_truncated_and_marked(scorer, reference):
    long_text = "a red circle " + "and a blue square " * 30
    data = _images()[0]
    itc, itm, truncated = scorer.score([_resized(scorer, data)], [long_text])
    assert truncated.tolist() == [True]
    ids = scorer.tokenizer(long_text, truncation=True, max_length=35)["input_ids"]
    cut_text = scorer.tokenizer.decode(ids, skip_special_tokens=True)
    ref_itc, ref_itm = reference(data, cut_text)
    assert itc[0] == pytest.approx(ref_itc, abs=1e-3)
    assert itm[0] == pytest.approx(ref_itm, abs=1e-3)


def test_empty_batch(scorer):
    itc, itm, truncated = scorer.score([], [])
    assert len(itc) == len(itm) == len(truncated) == 0


def _linear_output_dtypes(model):
    seen = set()
    handles = [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    return seen, handles


def test_explicit_fp32_equals_auto_on_cpu(scorer, tiny_itm):
    assert scorer.precision == "fp32"  # auto resolves to fp32 on the CPU
    fp32 = BlipScorer.from_pretrained(tiny_itm, device="cpu", precision="fp32")
    images = [_resized(scorer, d) for d in _images()]
    itc, itm, _ = scorer.score(images, TEXTS)
    itc32, itm32, _ = fp32.score(images, TEXTS)
    np.testing.assert_array_equal(itc32, itc)
    np.testing.assert_array_equal(itm32, itm)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_autocast_on_cpu_runs_in_half_and_stays_close(scorer, tiny_itm, precision, dtype):
    half = BlipScorer.from_pretrained(tiny_itm, device="cpu", precision=precision)
    assert half.precision == precision
    images = [_resized(scorer, d) for d in _images()]
    seen, handles = _linear_output_dtypes(half.model)
    try:
        itc16, itm16, _ = half.score(images, TEXTS)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {dtype}
    assert itc16.dtype == np.float32 and itm16.dtype == np.float32
    itc, itm, _ = scorer.score(images, TEXTS)
    # bf16 keeps ~3 significant digits (fp16 ~4); scores move, but only a little.
    np.testing.assert_allclose(itc16, itc, atol=0.05)
    np.testing.assert_allclose(itm16, itm, atol=0.05)


def test_device_normalisation_equals_the_processors(scorer):
    images = [_resized(scorer, d) for d in _images()[:3]]
    expected = scorer.images.image_processor(
        images=images, do_convert_rgb=False, do_resize=False, input_data_format="channels_first", return_tensors="pt"
    )["pixel_values"]
    got = scorer.images.to_device_pixel_values(images, "cpu", torch.float32)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_cpu_chunks_give_the_whole_batchs_scores_and_evidence(scorer):
    """On the CPU a batch runs CPU_CHUNK_ROWS rows at a time (for the caches): rows do not interact,
    so each row's scores and Grad-CAM map are the unchunked batch's up to the matrix kernels'
    blocking, which varies with a batch's size anyway (here up to 2e-7; 0 at the benchmark layout),
    and each image passes the vision encoder once."""
    from blip_ops.evidence import GradCam
    from blip_ops.scorer import CPU_CHUNK_ROWS

    assert scorer.chunk_rows == CPU_CHUNK_ROWS
    rows = 2 * CPU_CHUNK_ROWS + 3
    base = [_resized(scorer, d) for d in _images()]
    images = [np.roll(base[i % len(base)], i, axis=2) for i in range(rows)]
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(rows)]
    gradcam = GradCam(scorer.model, scorer.tokenizer)
    wanted = lambda itc, itm: np.arange(len(itc)) % 3 != 1  # noqa: E731  (rows across chunk borders)
    seen = []
    handle = scorer.model.vision_model.register_forward_hook(lambda module, args, out: seen.append(len(args[0]) if args else 0))
    try:
        chunked = scorer.score_explained(images, texts, wanted, gradcam)
    finally:
        handle.remove()
    scorer.chunk_rows = None
    try:
        whole = scorer.score_explained(images, texts, wanted, gradcam)
    finally:
        scorer.chunk_rows = CPU_CHUNK_ROWS
    assert len(seen) == 3
    _same_rows(chunked, whole)
    assert np.ptp(whole.itm) > 0.01  # rows that differ, or equality would prove little


def test_chunk_workers_run_the_chunks_side_by_side_with_one_thread_per_op_and_the_same_rows(scorer, tiny_itm):
    """chunk_workers=2: the chunks' passes run on two worker threads at once, each torch op on one
    thread for the while (restored after), in the caller's inference mode, with the serial scorer's rows."""
    import threading

    from blip_ops.evidence import GradCam, Wanted
    from blip_ops.scorer import CPU_CHUNK_ROWS

    side_by_side = BlipScorer.from_pretrained(tiny_itm, device="cpu", max_text_tokens=35, chunk_workers=2)
    rows = 3 * CPU_CHUNK_ROWS + 1
    base = [_resized(scorer, d) for d in _images()]
    images = [np.roll(base[i % len(base)], i, axis=2) for i in range(rows)]
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(rows)]
    wanted = lambda itc, itm: np.arange(len(itc)) % 2 == 0  # noqa: E731
    seen, lock = [], threading.Lock()
    # Two chunks in the vision pass at the same moment, or this fails; 120 s is only a bound for a broken
    # pool (on a loaded machine the second thread may start seconds late, never minutes).
    all_in = threading.Barrier(2, timeout=120)

    def record(module, args):
        with lock:
            seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_inference_mode_enabled()))
            first_two = len(seen) <= 2
        if first_two:
            all_in.wait()

    handle = side_by_side.model.vision_model.register_forward_pre_hook(record)
    before = torch.get_num_threads()
    try:
        got = side_by_side.score_explained(images, texts, wanted, GradCam(side_by_side.model, side_by_side.tokenizer))
    finally:
        handle.remove()
    assert len(seen) == 4 and len({ident for ident, _, _ in seen}) == 2
    assert threading.get_ident() not in {ident for ident, _, _ in seen}
    assert {threads for _, threads, _ in seen} == {1} and all(mode for _, _, mode in seen)
    assert torch.get_num_threads() == before
    serial_cam = GradCam(scorer.model, scorer.tokenizer)
    serial = scorer.score_explained(images, texts, wanted, serial_cam)
    _same_rows(got, serial)
    # The other evidence path: chunks wanted from ITC alone record their ITM pass's graph, each on its
    # worker's thread (GradCam's hooks act per thread).
    every = Wanted(lambda itc, itm: np.ones(len(itc), dtype=bool), lambda itc: np.ones(len(itc), dtype=bool))
    recorded = side_by_side.score_explained(images, texts, every, GradCam(side_by_side.model, side_by_side.tokenizer))
    _same_rows(recorded, scorer.score_explained(images, texts, every, serial_cam))
    assert all(e is not None for e in recorded.evidence)


def _same_rows(got, expected):
    np.testing.assert_allclose(got.itc, expected.itc, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.itm, expected.itm, rtol=0, atol=1e-6)
    assert [e is None for e in got.evidence] == [e is None for e in expected.evidence]
    for a, b in zip(got.evidence, expected.evidence):
        if a is not None:
            np.testing.assert_allclose(a.heat, b.heat, rtol=1e-4, atol=1e-6 * float(np.abs(b.heat).max()))
