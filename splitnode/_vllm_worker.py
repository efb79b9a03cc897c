"""vLLM's side of `splitnode bench --against-vllm PYTHON`, run by that interpreter (vLLM's own venv:
this file imports nothing from splitnode).

Protocol, one JSON object per line: after loading it writes {"ready": true, "version", "dtype",
"load_s", "env"} to stdout; then for each line {"prompts": [[ids...]...], "max_tokens": [n...]} read
from stdin it writes {"seconds", "outputs": [[ids...]...]} (greedy, EOS ignored, the generate call
alone timed); EOF ends it. On an error it writes {"error": "..."} and exits 1. vLLM logs to stdout,
so the protocol keeps a duplicate of the original stdout and everything else goes to stderr.

Unless --no-tune, it sets up what vLLM's CPU docs ask for, as the issue measured it: tcmalloc and
Intel OpenMP preloaded (vLLM's engine process is spawned, so LD_PRELOAD set here reaches it) and
the OpenMP threads bound to this process's cores (vLLM's own default keeps one core for its
scheduler). Variables the caller already set are left alone.
"""

import argparse
import glob
import json
import os
import sys
import time

TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
            "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")


def tune_env(num_cores: int) -> dict[str, str]:
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    if not any("tcmalloc" in p for p in preload):
        preload += [p for p in TCMALLOC if os.path.exists(p)][:1]
    if not any("iomp" in p or "gomp" in p for p in preload):
        preload += glob.glob(os.path.join(sys.prefix, "lib", "libiomp5.so"))[:1]
    os.environ["LD_PRELOAD"] = ":".join(preload)
    cores = sorted(os.sched_getaffinity(0))[:num_cores]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    return {k: os.environ[k] for k in ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="cores its OpenMP threads bind to")
    p.add_argument("--no-tune", action="store_true", help="vLLM's own defaults: no preloads, no thread binding")
    args = p.parse_args()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(obj) -> None:
        proto.write(json.dumps(obj) + "\n")

    try:
        env = {} if args.no_tune else tune_env(args.threads)
        t0 = time.perf_counter()
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        # No prefix caching: splitnode has none, and the bench repeats the same prompts each round,
        # which vLLM would then serve from its cache after the first, skipping prefill altogether.
        llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)), enable_prefix_caching=False, seed=0)
        send({"ready": True, "version": vllm.__version__, "dtype": args.dtype, "load_s": time.perf_counter() - t0,
              "env": env})
        for line in sys.stdin:
            req = json.loads(line)
            params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in req["max_tokens"]]
            prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            send({"seconds": seconds, "outputs": [list(o.outputs[0].token_ids) for o in outs]})
    except Exception as e:  # the bench shows it; the traceback is in the log
        import traceback

        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":  # vLLM's spawned engine process imports this file again: run only once
    sys.exit(main())
