"""A seeded sampled request draws the same tokens when its first token is drawn on a prompt worker
and the rest on a token worker as on one device alone: a draw is a hash of (seed, position), with
no generator state to carry in the hand-off."""

from __future__ import annotations

import asyncio
import random

from splitnode import LLM, SamplingParams
from splitnode.runtime import Runtime, RuntimeConfig

BLOCKS = 128


def prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in lengths]


async def test_a_seeded_request_draws_the_same_tokens_across_a_hand_off():
    ps = prompts([9, 40, 120])
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=20, ignore_eos=True, logprobs=1) for s in (1, 2, 3)]
    alone = LLM(num_kv_blocks=BLOCKS).generate(ps, params)
    cfg = RuntimeConfig(devices="cpu:2", roles={"cpu:0": "prompt", "cpu:1": "token"}, num_kv_blocks=BLOCKS,
                        layerwise_min_tokens=64, autoscale=False)
    async with Runtime(cfg) as rt:
        async def tokens(prompt, p):
            return [ev async for ev in rt.generate(prompt, p)][-1].token_ids

        split = await asyncio.gather(*[tokens(prompt, p) for prompt, p in zip(ps, params)])
        moved = rt.status()["transfers"]["num_sequences"]
    assert moved == len(ps)  # every request was handed from the prompt worker to the token worker
    assert split == [o.token_ids for o in alone]
    assert all(len(set(o.token_ids)) > 5 for o in alone)  # drawn at temperature 1, not stuck on one token
