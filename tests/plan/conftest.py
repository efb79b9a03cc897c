"""Hand-made profiles: step times chosen so that a simulated run's timings can be worked out by
hand (constant prefill and decode steps, optional slopes, optional KV moves and co-run factor)."""

from __future__ import annotations

import pytest

from splitnode.plan.profile import Profile


def flat_profile(prefill_s: float = 0.010, decode_s: float = 0.002, per_token_s: float = 0.0, per_seq_s: float = 0.0,
                 mixed_shared_s: float = 0.0, num_kv_blocks: int = 100_000, quad_s: float = 0.0, transfer=None, corun=None,
                 power_w=None, **fields) -> Profile:
    """Prefill of n tokens: prefill_s + per_token_s * (n - 1); decode of b sequences:
    decode_s + per_seq_s * (b - 1), whatever their context."""
    base = {"model": "hand-made", "device": "test device", "kind": "cpu", "dtype": "float32", "resolved_dtype": "float32",
            "block_size": 16, "max_num_batched_tokens": 2048, "max_num_seqs": 256, "kv_bytes_per_token": 1024,
            "num_layers": 4, "max_model_len": 1 << 20}
    return Profile(
        **{**base, **fields}, num_kv_blocks=num_kv_blocks,
        prefill={"tokens": [1, 2048], "s": [prefill_s, prefill_s + per_token_s * 2047], "shared_s": 0.0, "quad_s": quad_s},
        decode=[{"batch": 1, "context": [1], "s": [decode_s]}, {"batch": 256, "context": [1], "s": [decode_s + per_seq_s * 255]}],
        mixed={"shared_s": mixed_shared_s, "points": []},
        transfer=transfer or {"fixed_s": 0.0, "s_per_byte": 0.0, "layer_fixed_s": 0.0, "sync": True},
        corun=corun, power_w=power_w)


@pytest.fixture
def make_profile():
    return flat_profile
