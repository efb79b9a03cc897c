"""A device's cost model, measured on this box with the real engine (`splitnode plan --profile`,
which runs plan/measure.py): the Profile, its file and its cache key.

What is measured, and why it is enough to replay splitnode's scheduling:
- prefill time of one fresh prompt against its tokens, a ladder up to the token budget; one batch
  of several prompts (what a batch shares: the step's fixed cost), and one chunk that runs after a
  prefix (attention over the prefix: the quadratic term chunked prefill pays);
- decode step time against batch size and context per sequence, a small grid;
- a mixed batch or two (a prefill and decodes in one step share the step's fixed cost);
- the KV move between two devices of the kind through the runtime's own mover, as a fixed cost
  per call plus a time per byte, for the whole-sequence and the per-layer path;
- with two or more devices of the kind, each step kind again while another device steps at the
  same time: workers are threads of one process, and on CPU the GIL couples them (README,
  "CPU devices"); the simulator applies the measured slowdown when devices overlap;
- on a GPU with NVML, the board's power while prefilling, decoding and idle (energy per token);
- a few requests alone through a real one-device `Runtime`, stamped as `bench serve` stamps them:
  what the runtime adds to the engine's steps (the worker's turn around each step, and the way
  from the client to the worker and back: thread hops, the event loop).

Between the measured points the model interpolates piecewise-linearly (and extrapolates from the
last segment). A profile is JSON in the user's cache dir, keyed by model, device name and dtype;
it records the splitnode version that measured it, and one from another version is refused (the
engine's speed is what it describes). `--profile-file` reads and writes any path, so a profile
measured on another box plans hardware that is not here.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = 1


class ProfileError(ValueError):
    """A profile that cannot be used (missing, another version, malformed): one line for the user."""


def _version() -> str:
    from splitnode import __version__

    return __version__


def monotone(ys: list[float]) -> list[float]:
    """The closest non-decreasing sequence (least squares, pool adjacent violators): a step with
    more work never takes less time, and a shared machine's noise should not say otherwise."""
    blocks: list[list[float]] = []  # [sum, count]
    for y in ys:
        blocks.append([y, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    return [s / n for s, n in blocks for _ in range(n)]


def interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), xs ascending; below the first point its value (a step
    with less work still pays the fixed cost), above the last the last segment extended."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    i = bisect.bisect_left(xs, x)
    if i >= len(xs):
        i = len(xs) - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass
class Profile:
    """One device kind running one model in one dtype. Times are seconds."""

    model: str
    device: str  # "NVIDIA H200", "AMD EPYC, 1 core"
    kind: str  # "cuda" or "cpu"
    dtype: str  # as asked ("auto" included): the key
    resolved_dtype: str
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    num_kv_blocks: int  # what the engine sized on the profiled device (the default capacity)
    kv_bytes_per_token: int  # every layer's K and V
    num_layers: int
    max_model_len: int
    prefill: dict  # {"tokens": [...], "s": [...], "shared_s": a, "quad_s": c}
    decode: list[dict]  # rows {"batch": b, "context": [...], "s": [...]}, ascending batch
    mixed: dict  # {"shared_s": s, "points": [[prefill_tokens, decodes, context, s], ...]}
    transfer: dict  # {"fixed_s", "s_per_byte", "layer_fixed_s", "sync"}
    # {own step kind: {the other device's step kind: [[batch or tokens, factor], ...]}}, kinds "decode"/"prefill"
    corun: dict | None = None
    power_w: dict | None = None  # {"prefill": W, "decode": W, "idle": W}; None: not measured (CPU)
    # {"step_s": added to every step, "latency_s": to every token's time, "loop_s_per_token": the event loop's
    # CPU per token (charged to the workers' steps when they take every one of the box's "cores")}
    overhead: dict | None = None
    measured: dict = field(default_factory=dict)  # when, how long, where, what was skipped
    version: str = field(default_factory=_version)
    format: int = FORMAT

    def __post_init__(self) -> None:
        self.decode = sorted(self.decode, key=lambda r: r["batch"])
        # The model reads the measured points made monotone (the JSON keeps them as measured): in
        # context along each row, then in batch size (a row is never below the one before it).
        self._rows = []
        for r in self.decode:
            ys = monotone(list(r["s"]))
            if self._rows:
                _, xs0, ys0 = self._rows[-1]
                ys = [max(y, interp(xs0, ys0, c)) for c, y in zip(r["context"], ys)]
            self._rows.append((r["batch"], list(r["context"]), ys))
        self._row_batches = [b for b, _, _ in self._rows]
        p = self.prefill
        self._pre = (list(p["tokens"]), monotone(list(p["s"])))
        self._shared, self._quad, self._mixed_shared = p["shared_s"], p["quad_s"], self.mixed["shared_s"]
        self._corun = {(own, other): ([a for a, _ in pts], [max(1.0, f) for _, f in pts])
                       for own, by_other in (self.corun or {}).items() for other, pts in by_other.items() if pts}
        over = self.overhead or {}
        self.step_overhead_s, self.latency_s = over.get("step_s", 0.0), over.get("latency_s", 0.0)
        self.loop_s_per_token, self.cores = over.get("loop_s_per_token", 0.0), over.get("cores")

    # -- the cost model ---------------------------------------------------------------------------

    def prefill_s(self, num_tokens: int) -> float:
        return interp(*self._pre, num_tokens)

    def chunk_s(self, num_tokens: int, num_computed: int) -> float:
        """A prefill chunk of `num_tokens` after `num_computed` tokens of its sequence: attention
        over the prefix adds 2*quad*n*k to a fresh prompt's time (the cross term of (n+k)^2)."""
        return self.prefill_s(num_tokens) + 2.0 * self._quad * num_tokens * num_computed

    def decode_s(self, num_decodes: int, context_sum: int) -> float:
        """A decode step of `num_decodes` sequences holding `context_sum` tokens in all."""
        rows, batches = self._rows, self._row_batches
        c = context_sum / num_decodes
        i = bisect.bisect_left(batches, num_decodes)
        if i < len(rows) and batches[i] == num_decodes or len(rows) == 1:
            return interp(rows[min(i, len(rows) - 1)][1], rows[min(i, len(rows) - 1)][2], c)
        if i == 0:
            return interp(rows[0][1], rows[0][2], c)
        if i >= len(rows):
            i = len(rows) - 1
        (b0, c0, s0), (b1, c1, s1) = rows[i - 1], rows[i]
        y0, y1 = interp(c0, s0, c), interp(c1, s1, c)
        return max(y0, y0 + (y1 - y0) * (num_decodes - b0) / (b1 - b0))

    def step_s(self, chunks: list[tuple[int, int]], num_decodes: int, context_sum: int) -> float:
        """One batch: prefill chunks [(tokens, computed before)], plus decodes. The chunks of one
        batch share the step's fixed cost once; a mixed batch shares it with its decodes."""
        t = 0.0
        if chunks:
            parts = [self.chunk_s(n, k) for n, k in chunks]
            t = max(max(parts), sum(parts) - self._shared * (len(parts) - 1))
        if num_decodes:
            d = self.decode_s(num_decodes, context_sum)
            t = max(t, d, t + d - self._mixed_shared) if chunks else d
        return t

    def move_s(self, num_bytes: int, layers: int = 0) -> float:
        """A KV move of `num_bytes`: in one mover call over every layer (the whole path), or in
        `layers` calls of one layer each (the layer-wise path)."""
        tr = self.transfer
        fixed = tr["layer_fixed_s"] * layers if layers else tr["fixed_s"]
        return fixed + num_bytes * tr["s_per_byte"]

    def corun_factor(self, is_prefill: bool, size: float, decoding: int, prefilling: int) -> float:
        """How much slower a step runs while other devices of the kind step at the same time:
        `decoding` of them in decode-only steps, `prefilling` in steps with prefill chunks (a
        decode step is mostly Python under the GIL, a prefill mostly matmuls that release it, so
        the neighbour's kind matters). Measured with one neighbour; more add up linearly."""
        own = "prefill" if is_prefill else "decode"
        f = 1.0
        for other, n in (("decode", decoding), ("prefill", prefilling)):
            pts = self._corun.get((own, other)) if n else None
            if pts is not None:
                f += (interp(*pts, size) - 1.0) * n
        return f

    def kv_blocks(self, block_size: int) -> int:
        """The profiled device's KV pool in blocks of `block_size` tokens (the same memory)."""
        return self.num_kv_blocks * self.block_size // block_size

    # -- storage ------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)  # a reader never sees half a profile
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileError(f"no profile at {path}: measure one with `splitnode plan --profile`") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ProfileError(f"{path} is not a readable profile ({e}); re-profile with `splitnode plan --profile`") from None
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: dict, where: str = "profile") -> Profile:
        if not isinstance(data, dict):
            raise ProfileError(f"{where} is not a splitnode profile (no JSON object); re-profile with `splitnode plan --profile`")
        version, now = data.get("version"), _version()
        if version != now or data.get("format") != FORMAT:
            raise ProfileError(f"{where} was measured by splitnode {version} (profile format {data.get('format')}); "
                               f"this is splitnode {now}, whose engine it may not describe: re-profile with "
                               "`splitnode plan --profile`")
        try:
            return cls(**data)
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise ProfileError(f"{where} is malformed ({e}); re-profile with `splitnode plan --profile`") from None


def profile_dir() -> Path:
    from splitnode.model.demo import default_cache_dir

    return default_cache_dir() / "profiles"


def profile_path(model: str, device: str, dtype: str) -> Path:
    """The cache file of (model, device name, dtype); the version is checked inside, so an old
    profile is found and refused with a reason instead of silently missing."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}--{device}--{dtype}").strip("_")
    return profile_dir() / f"{slug}.json"


def model_key(model: str | None) -> str:
    """The demo model's name, or a folder's name plus a hash of its config.json (the same
    checkpoint in another folder is the same model; a changed one is not)."""
    if model is None:
        from splitnode.model.demo import DEMO_NAME

        return DEMO_NAME
    path = Path(model).expanduser()
    config = path / "config.json"
    digest = hashlib.sha1(config.read_bytes()).hexdigest()[:8] if config.is_file() else "noconfig"
    return f"{path.name}-{digest}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(worker: str, cpu_threads: int | None = None) -> str:
    """What a profile is keyed by: the GPU's name, or the CPU's with the cores one worker has."""
    from splitnode.runtime.config import torch_device

    dev = torch_device(worker)
    if dev == "cpu":
        n = cpu_threads or 1
        return f"{cpu_name()}, {n} core{'s' if n > 1 else ''}"
    import torch

    return torch.cuda.get_device_name(int(dev.partition(":")[2] or 0))
