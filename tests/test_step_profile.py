"""benchmarks.step_profile sorts a profiled op into the right kind of work and counts its FLOPs."""

from benchmarks.step_profile import kind_of, matmul_flops

VOCAB, R = 49152, 16


def test_matrix_products_are_told_apart_by_shape():
    assert kind_of("aten::mm", [[1024, 576], [576, 1536]], VOCAB, R) == "matmul, frozen base"
    assert kind_of("aten::mm", [[256, 576], [576, VOCAB]], VOCAB, R) == "matmul, output head"
    assert kind_of("aten::mm", [[1024, 576], [576, 48]], VOCAB, R) == "matmul, adapters"  # q/k/v's A stacked
    assert kind_of("aten::addmm_", [[1024, 576], [1024, 16], [16, 576]], VOCAB, R) == "matmul, adapters"
    assert kind_of("aten::bmm", [[9, 64, 64], [9, 64, 64]], VOCAB, R) == "matmul, frozen base"


def test_other_ops():
    assert kind_of("aten::_scaled_dot_product_flash_attention_for_cpu", [], VOCAB, R) == "attention"
    assert kind_of("aten::random_", [[1024]], VOCAB, R) == "dropout masks"
    assert kind_of("aten::mul", [[1024, 576], [1024, 576]], VOCAB, R) == "everything else"


def test_flops_of_the_leaf_products_only():
    assert matmul_flops("aten::mm", [[1024, 576], [576, 1536]]) == 2 * 1024 * 576 * 1536
    assert matmul_flops("aten::addmm", [[1536], [1024, 576], [576, 1536]]) == 2 * 1024 * 576 * 1536
    assert matmul_flops("aten::bmm", [[3, 8, 4], [3, 4, 5]]) == 2 * 3 * 8 * 4 * 5
    assert matmul_flops("aten::linear", [[1024, 576], [1536, 576], []]) == 0  # dispatches to addmm / mm
    assert matmul_flops("aten::mul", [[4, 4], [4, 4]]) == 0


def test_the_products_inside_the_chunked_head_are_found_by_its_event():
    # on a CPU the chunked head runs the vocabulary in blocks, so its products' shapes do not name it
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.step_profile import MATMULS, _inside
    from lorakit.train.chunked_loss import chunked_causal_lm_loss

    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 4099, bias=False).requires_grad_(False)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        chunked_causal_lm_loss(hidden, head, torch.randint(0, 4099, (2, 5))).backward()
    events = prof.events()
    inside = _inside(events, "_ChunkedHeadLoss")
    products = [e for e in events if e.name in MATMULS and e.id in inside]
    assert len(products) >= 3  # 4,099 columns: three blocks of the forward product, and the backward's
    assert any(4099 not in [d for s in e.input_shapes for d in s] for e in products)  # shapes alone miss them
