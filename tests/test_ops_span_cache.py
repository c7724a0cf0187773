"""The checked-span cache: (B,) span tensors checked once, not on every call (each check of a CUDA
tensor's values is a device sync), and checked again whenever they may have changed."""
import pytest
import torch

import taca
from taca import ops


@pytest.fixture
def counted_checks(monkeypatch, spy):
    monkeypatch.setattr(ops, "_CHECKED_SPANS", type(ops._CHECKED_SPANS)())
    return spy(ops, "_check_span")


def _qkv(B=2, N=12, D=8):
    torch.manual_seed(0)
    return tuple(torch.randn(B, 2, N, D) for _ in range(3))


def test_same_tensors_are_checked_once(counted_checks):
    q, k, v = _qkv()
    tl = torch.tensor([3, 5])
    outs = [taca.joint_attention(q, k, v, text_len=tl, gamma=1.2, backend="cpu") for _ in range(3)]
    assert len(counted_checks) == 1
    assert torch.equal(outs[0], outs[2])
    # ints are checked without a tensor read: they never enter the cache
    taca.joint_attention(q, k, v, text_len=3, gamma=1.2, backend="cpu")
    assert len(counted_checks) == 2 and len(ops._CHECKED_SPANS) == 1


def test_changed_or_new_tensors_are_checked_again(counted_checks):
    q, k, v = _qkv()
    tl = torch.tensor([3, 5])
    taca.joint_attention(q, k, v, text_len=tl, backend="cpu")
    tl[1] = 13  # in place: past N = 12, caught although this tensor passed before
    with pytest.raises(ValueError, match=r"key text span of sample 1"):
        taca.joint_attention(q, k, v, text_len=tl, backend="cpu")
    tl[1] = 4
    taca.joint_attention(q, k, v, text_len=tl, backend="cpu")
    taca.joint_attention(q, k, v, text_len=torch.tensor([3, 4]), backend="cpu")  # another tensor, same values
    assert len(counted_checks) == 4


def test_span_lengths_are_part_of_the_key(counted_checks):
    """The same tensors against another sequence length, or with text_start added, are checked again."""
    q, k, v = _qkv()
    tl, ts = torch.tensor([3, 5]), torch.tensor([0, 7])
    taca.joint_attention(q, k, v, text_len=tl, backend="cpu")
    taca.joint_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], text_len=tl, backend="cpu")
    with pytest.raises(ValueError, match=r"key text span of sample 1, \[7, 12\)"):
        taca.joint_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], text_len=tl, text_start=ts, backend="cpu")
    taca.joint_attention(q, k, v, text_len=tl, text_start=ts, backend="cpu")
    assert len(counted_checks) == 4


def test_cache_is_bounded_and_holds_no_tensor(counted_checks):
    """Temporary tensors: each is checked (a freed one's id and address may come back with the next
    tensor, whose key is then equal: its dead weak reference sends it to the check), the cache stays
    bounded and keeps none of them alive."""
    q, k, v = _qkv()
    n = ops._CHECKED_SPANS_MAX + 10
    for i in range(n):
        taca.joint_attention(q, k, v, text_len=torch.tensor([i % 12, 2]), backend="cpu")
    assert len(counted_checks) == n
    assert 1 <= len(ops._CHECKED_SPANS) <= ops._CHECKED_SPANS_MAX
    assert all(r() is None for refs in ops._CHECKED_SPANS.values() for r in refs)  # weak references only
    kept = [torch.tensor([i % 12, 2]) for i in range(n)]  # alive: distinct keys, the oldest evicted
    for t in kept:
        taca.joint_attention(q, k, v, text_len=t, backend="cpu")
    assert len(ops._CHECKED_SPANS) == ops._CHECKED_SPANS_MAX


def test_threads_share_the_cache(counted_checks):
    """Calls from several threads (a server running pipelines side by side): no error, every set checked."""
    import threading

    q, k, v = _qkv()
    tensors = [torch.tensor([i % 12, 2]) for i in range(ops._CHECKED_SPANS_MAX * 2)]
    errors = []

    def work(part):
        try:
            for t in part:
                taca.joint_attention(q, k, v, text_len=t, backend="cpu")
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(tensors[i::4],)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(counted_checks) == len(tensors)
    assert len(ops._CHECKED_SPANS) == ops._CHECKED_SPANS_MAX
