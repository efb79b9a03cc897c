"""What the dashboard shows, as text: pure functions from `status()` samples (and the rates
between them) to table cells and panel lines. Kept apart from the widgets so tests and other
front ends can read the same numbers."""

from __future__ import annotations

from rich.text import Text

from splitnode.runtime.status import PoolSignals, format_ms, format_prediction
from splitnode.tui.rates import Rates

ROLE_STYLE = {"prompt": "bold magenta", "token": "bold cyan", "mixed": "bold yellow"}
MIB = 1024 * 1024
GIB = 1024 * MIB

# (key, header, width or None to fit) of the device table, left to right. The role column is wide
# enough for "token→prompt pinned" so a role change does not make the table jump. BUSY is the
# worker's share of time in batches; after the slash, NVML's GPU utilization where there is one.
COLUMNS = (
    ("device", "DEVICE", None), ("role", "ROLE", 19), ("kv", "KV BLOCKS used/total", 20), ("reserved", "RSV", None),
    ("queues", "QUEUE w/r/a", None), ("batch", "BATCH s/tok", None), ("busy", "BUSY/GPU", None),
    ("power", "POWER/CAP", None), ("temp", "TEMP", None), ("memory", "GPU MEM", None),
)


def bar(fraction: float, width: int = 7) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * width)
    return "█" * full + "░" * (width - full)


def role_cell(dev: dict) -> Text:
    text = Text(dev["role"], style=ROLE_STYLE.get(dev["role"], ""))
    if dev.get("target_role"):
        text.append("→")
        text.append(dev["target_role"], style=ROLE_STYLE.get(dev["target_role"], ""))
    if dev.get("pinned"):
        text.append(" pinned", style="bold")
    if dev.get("borrowed_from"):
        text.append(" borrowed", style="italic")  # the pools panel says from which pool
    if dev.get("error"):
        text.append(" FAILED", style="bold red")
    return text


def kv_cell(dev: dict) -> Text:
    used, total = dev["kv_blocks_used"], dev["kv_blocks_total"]
    frac = used / total if total else 0.0
    style = "red" if frac > 0.9 else "yellow" if frac > 0.7 else "green"
    text = Text(bar(frac), style=style)
    text.append(f" {used}/{total}")
    return text


def gpu_na(gpu: dict | None) -> str:
    """Why a GPU column is empty, briefly: "n/a (cpu)", "n/a (no NVML)", "n/a"."""
    reason = (gpu or {}).get("reason") or ""
    if reason == "cpu worker":
        return "n/a (cpu)"
    if reason.startswith("NVML not available"):
        return "n/a (no NVML)"
    return "n/a"


def _num(value, fmt: str) -> str:
    return "?" if value is None else format(value, fmt)


def device_cells(dev: dict, busy: float | None) -> dict[str, object]:
    gpu = dev.get("gpu") or {}
    cells: dict[str, object] = {
        "device": dev["name"],
        "role": role_cell(dev),
        "kv": kv_cell(dev),
        "reserved": str(dev["kv_blocks_reserved"]),
        "queues": f"{dev['waiting']}/{dev['running']}/{dev['arriving']}",
        "batch": f"{dev['batch_size']}/{dev['batch_tokens']}",
        "busy": "-" if busy is None else f"{min(busy, 1.0):.0%}",
    }
    if gpu.get("available"):
        cells["busy"] += f"/{_num(gpu.get('util_pct'), 'd')}%"
        cells["power"] = f"{_num(gpu.get('power_w'), '.0f')}/{_num(gpu.get('power_limit_w'), '.0f')} W"
        cells["temp"] = f"{_num(gpu.get('temp_c'), 'd')}°C"
        used, total = gpu.get("mem_used_bytes"), gpu.get("mem_total_bytes")
        cells["memory"] = (f"{_num(None if used is None else used / GIB, '.1f')}/"
                           f"{_num(None if total is None else total / GIB, '.0f')} GiB")
    else:
        na = gpu_na(gpu)
        cells["power"], cells["temp"], cells["memory"] = na, "n/a", na
    return cells


def fmt_duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def header_text(status: dict, where: str, mode: str, load: str) -> Text:
    devs = status["devices"]
    counts = {r: sum(d["role"] == r for d in devs) for r in ROLE_STYLE}
    rt = status.get("runtime") or {}
    text = Text("splitnode", style="bold")
    text.append(f"  model {rt.get('model', '?')}  ·  {len(devs)} devices: ")
    text.append(" · ".join(f"{n} {r}" for r, n in counts.items()))
    text.append(f"  ·  up {fmt_duration(rt.get('uptime_s', 0.0))}\n{where}\n")
    text.append(f"role changes: {mode}", style="bold" if mode == "drain" else "")
    text.append(f"   load: {load}")
    return text


def prediction_line(status: dict) -> Text:
    """The line under the requests in flight: `splitnode plan`'s goodput for the devices' layout on
    the traffic they served (dim while there is none)."""
    pred = status.get("prediction")
    return Text(format_prediction(pred), style="" if pred and pred.get("available") else "dim")


def pool_signals(status: dict) -> PoolSignals:
    """The autoscaler's signals as the runtime computed them. An older server over the socket sends
    none: then they are worked out from its devices, as the autoscaler does."""
    if "signals" in status:
        return status["signals"]
    devs = status["devices"]
    token = [d for d in devs if d["role"] == "token"]
    total = sum(d["kv_blocks_total"] for d in token)
    return {
        "prompt_queue_tokens": sum(d["pending_prompt_tokens"] for d in devs if d["role"] == "prompt"),
        "token_kv_occupancy": sum(d["kv_blocks_used"] for d in token) / total if total else 0.0,
    }


def pools_lines(status: dict) -> str:
    devs, pol, sig = status["devices"], status.get("policy") or {}, pool_signals(status)
    counts = {r: [d["name"] for d in devs if d["role"] == r] for r in ROLE_STYLE}
    lines = [f"{r:<6} {len(names)}  {' '.join(names)}" for r, names in counts.items()]
    lines.append(f"prompt queue {sig['prompt_queue_tokens']:>5} tok  borrow>{pol.get('borrow_prompt_tokens', '?')}")
    lines.append(f"token KV     {sig['token_kv_occupancy']:>5.0%}      borrow>{pol.get('borrow_kv_occupancy', 0):.0%}")
    borrowed = [f"{d['name']}({d['borrowed_from']})" for d in devs if d.get("borrowed_from")]
    pinned = [d["name"] for d in devs if d.get("pinned")]
    lines.append(f"autoscale {'on' if pol.get('autoscale') else 'off'}  borrowed {' '.join(borrowed) or '-'}")
    lines.append(f"pinned {' '.join(pinned) or '-'}")
    return "\n".join(lines)


def transfers_lines(status: dict, rates: Rates) -> str:
    t = status["transfers"]
    rate = rates.rate(lambda s: s["transfers"]["bytes_moved"])
    seqs = rates.rate(lambda s: s["transfers"]["num_sequences"])
    return "\n".join([
        f"moved     {t['bytes_moved'] / MIB:.1f} MiB",
        f"rate      {'-' if rate is None else f'{rate / MIB:.2f}'} MiB/s",
        f"requests  {t['num_sequences']}  ({'-' if seqs is None else f'{seqs:.1f}'}/s)",
        f"copies    {t['num_transfers']}  in {t['seconds']:.2f} s",
        f"in flight {t['in_flight']}   failed {t['num_failed']}",
    ])


def requests_lines(status: dict, rates: Rates) -> str:
    r = status["requests"]
    tok = rates.rate(lambda s: s["requests"].get("num_generated_tokens"))
    done = rates.rate(lambda s: s["requests"]["finished"])
    lines = [
        f"active {r['active']}   finished {r['finished']}  ({'-' if done is None else f'{done:.1f}'}/s)",
        f"throughput  {'-' if tok is None else f'{tok:.0f}'} tok/s",
        f"TTFT p50/90/99  {format_ms(r.get('ttft_s'))}",
        f"TBT  p50/90/99  {format_ms(r.get('tbt_s'))}",
        f"energy  {energy_line(status, rates, tok)}",
    ]
    return "\n".join(lines)


def _energy_j(status: dict) -> float | None:
    gpus = [d["gpu"] for d in status["devices"] if (d.get("gpu") or {}).get("available")]
    if not gpus or any(g.get("energy_j") is None for g in gpus):
        return None
    return sum(g["energy_j"] for g in gpus)


def energy_line(status: dict, rates: Rates, tok_per_s: float | None) -> str:
    """Power and tokens per joule over the GPUs, from NVML's energy counters."""
    gpus = [d.get("gpu") or {} for d in status["devices"]]
    if not any(g.get("available") for g in gpus):
        return gpu_na(gpus[0] if gpus else None)
    watts = rates.rate(_energy_j)
    if watts is None:
        power = [g["power_w"] for g in gpus if g.get("power_w") is not None]
        return f"{sum(power):.0f} W" if power else "n/a"
    per_joule = "-" if not tok_per_s or watts <= 0 else f"{tok_per_s / watts:.2f} tok/J"
    return f"{watts:.0f} W  {per_joule}"
