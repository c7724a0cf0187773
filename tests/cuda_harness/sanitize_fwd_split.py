"""The D = 128 forward's tail split (TACA_FWD_SPLIT) alone, for compute-sanitizer (memcheck / racecheck), short
enough for racecheck in a device call of its own (sanitize_fwd.py runs it last too).

Run: compute-sanitizer --tool racecheck --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd_split.py
More items than SMs with a partial last wave (7 query tiles x H heads of 800 tokens), the tail items as 3 key ranges,
then as 7 (one key tile each: TACA_FWD_SPLIT=16 is clamped to the 7 key tiles), as 3 in the two-launch form, and
in the range form (one contiguous range of the tail's key tiles per CTA) in both;
text_mass on, so the merge carries it. Then the feature instances (two samples): per-sample text lengths, and a
(B, 1, 1, N) key mask (the per-tile terms, bool and float) with them, in 3 ranges and in the range form.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import taca  # noqa: E402


def split_heads(N, B=1, range_form=False, default=False):
    """A head count that gives the D = 128 forward (128-row query tiles) of (B, H, N) a partial last wave on this GPU
    (range_form: with at least as many tail key tiles U as SMs, which TACA_FWD_SPLIT=range needs; default: also
    ceil(U / SMs) + 10 < the key tiles, where the default, TACA_FWD_SPLIT unset, splits; None if no head count up to
    4 x SMs does)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    nqt = -(-N // 128)
    for h in range(sms // (nqt * B) + 1, 4 * sms + 1):
        u = (nqt * h * B) % sms * nqt
        if u and (not (range_form or default) or u >= sms) and (not default or -(-u // sms) + 10 < nqt):
            return h
    return None


def main():
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    runs = 0
    for dt, tf in ((torch.bfloat16, True), (torch.float16, False)):
        for parts, form in (("3", "one"), ("16", "one"), ("3", "two"), ("range", "one"), ("range", "two")):
            q, k, v = (torch.randn(1, split_heads(800, range_form=parts == "range"), 800, 128, device="cuda", dtype=dt)
                       for _ in range(3))
            os.environ["TACA_FWD_SPLIT"] = parts
            os.environ["TACA_FWD_SPLIT_FORM"] = form
            taca.joint_attention(q, k, v, text_len=104, text_first=tf, gamma=1.2, backend="cuda", return_text_mass=True)
            runs += 1 + (form == "two")
    # the feature instances: two samples' text lengths (FEAT), and a key mask's per-tile terms (MK_KEY)
    os.environ["TACA_FWD_SPLIT_FORM"] = "one"
    tl = torch.tensor([104, 37], device="cuda")
    km = torch.ones(2, 1, 1, 800, dtype=torch.bool, device="cuda")
    km[1, ..., 37:104] = False  # sample 1's padded text
    fm = torch.zeros(2, 1, 1, 800, device="cuda")
    fm[..., ::7] = -1.5
    fm[0, ..., 300:340] = float("-inf")
    for parts in ("3", "range"):
        os.environ["TACA_FWD_SPLIT"] = parts
        q, k, v = (torch.randn(2, split_heads(800, B=2, range_form=parts == "range"), 800, 128, device="cuda",
                               dtype=torch.bfloat16) for _ in range(3))
        for mask in (None, km, fm):
            taca.joint_attention(q, k, v, text_len=tl, gamma=1.2, attn_mask=mask, backend="cuda", return_text_mass=True)
            runs += 1
    os.environ.pop("TACA_FWD_SPLIT")
    os.environ.pop("TACA_FWD_SPLIT_FORM")
    torch.cuda.synchronize()
    print(f"sanitize_fwd_split: {runs} kernel calls done ({split_heads(800)} / {split_heads(800, range_form=True)} heads, "
          f"{sms} SMs)")
    return runs


if __name__ == "__main__":
    main()
