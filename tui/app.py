"""The splitnode dashboard: what an operator keeps open while the runtime serves.

One row per device (role, KV blocks, queues, batch, busy share, GPU power, temperature, memory),
then the pools (the autoscaler's signals against its thresholds), the KV transfers (the machine's
"NVLink traffic") and the requests (throughput, TTFT, TBT), then the requests in flight and the
predicted goodput of the devices' layout. Keys move
the selected device between roles and drive a built-in load generator.

It reads and acts only through a backend (`LocalBackend(rt)` or `RemoteBackend(client)`), so it
runs the same in-process (`splitnode up`) and attached over the socket (`splitnode dash`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Static

from splitnode.tui.backend import Backend
from splitnode.tui.load import LoadGenerator
from splitnode.tui.rates import Rates
from splitnode.tui.view import COLUMNS, device_cells, header_text, pools_lines, prediction_line, requests_lines, transfers_lines

# What the keys alone do not say (the keys themselves come from the bindings); one line a
# paragraph: the help wraps it to its width.
HELP_PROSE = (
    "Role changes migrate (the default) or drain: migrate moves the device's decodes to another token "
    "worker, drain finishes them where they are.\n\n"
    "A move the runtime refuses (one that would leave a phase without workers) shows its reason and "
    "changes nothing."
)

MAX_IN_FLIGHT_ROWS = 200


@dataclass(frozen=True)
class Panes:
    """The main screen's widgets, found once they are mounted."""

    header: Static
    devices: DataTable
    pools: Static
    transfers: Static
    requests: Static
    in_flight: DataTable
    prediction: Static


class StatusSampled(Message):
    """A fresh `status()`; one still queued behind a newer one is dropped (bursts collapse)."""

    def __init__(self, status: dict, t: float, session: int):
        super().__init__()
        self.status = status
        self.t = t
        self.session = session

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StatusSampled)


class StatusFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


def key_name(app: App, binding: Binding) -> str:
    """One key of a binding as the help names it. Not its key_display: that is the footer's label
    for all of a binding's keys (its "?" stands for h too)."""
    key = binding.key
    if key.startswith("shift+") and len(key) == 7:  # shift+p is how some terminals send P
        key = key[-1].upper()
    return app.get_key_display(binding.with_key(key))


def help_rows(app: App, bindings: Iterable[BindingType]) -> list[tuple[str, str]]:
    """(keys, what they do) in the order bound; keys that do the same (? and h, P and shift+p) share a
    row. What they do is the binding's tooltip, else its description: footer labels are terse."""
    rows: dict[str, list[str]] = {}
    for binding in Binding.make_bindings(bindings):
        names = rows.setdefault(binding.tooltip or binding.description, [])
        if (name := key_name(app, binding)) not in names:
            names.append(name)
    return [(" ".join(names), text) for text, names in rows.items()]


def help_text(app: App, bindings: Iterable[BindingType], close_keys: list[str]) -> Text:
    rows = help_rows(app, bindings)
    width = max(len(keys) for keys, _ in rows)
    text = Text()
    text.append("splitnode dashboard", style="bold")
    text.append("\n\n")
    for keys, what in rows:
        text.append(f"  {keys:<{width}}", style="bold")
        text.append(f"  {what}\n")
    text.append(f"\n{HELP_PROSE}\n\n")
    text.append(f"{', '.join(close_keys[:-1])} or {close_keys[-1]} closes this help", style="dim")
    return text


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,h", "dismiss", "Close")]

    def __init__(self, bindings: Iterable[BindingType]):
        super().__init__()
        self.listed = bindings  # the dashboard's

    def compose(self) -> ComposeResult:
        close = [key_name(self.app, b) for b in Binding.make_bindings(self.BINDINGS)]
        yield Static(help_text(self.app, self.listed, close), id="help")


class _Notifier(logging.Handler):
    """Runtime warnings (a failed KV transfer, a worker error) as notifications, from any thread;
    printed to the terminal they would tear the screen."""

    def __init__(self, app: App, loop: asyncio.AbstractEventLoop):
        super().__init__(logging.WARNING)
        self.app, self.loop = app, loop

    def emit(self, record: logging.LogRecord) -> None:
        severity = "error" if record.levelno >= logging.ERROR else "warning"
        self.loop.call_soon_threadsafe(self.app.notify, record.getMessage(), severity=severity, timeout=8)


class Dashboard(App):
    CSS_PATH = "dashboard.tcss"
    TITLE = "splitnode"
    BINDINGS = [
        Binding("q", "quit", "Quit", tooltip="Quit (under splitnode up, the runtime stops too)"),
        Binding("question_mark,h", "help", "Help", key_display="?", tooltip="This help"),
        Binding("j", "cursor(1)", "Select a device (as ↓ ↑ do)", show=False),  # ↓ ↑: the table's own
        Binding("k", "cursor(-1)", "Select a device (as ↓ ↑ do)", show=False),
        Binding("p", "assign('prompt')", "→prompt", tooltip="Move the selected device to the prompt role, pinned"),
        Binding("t", "assign('token')", "→token", tooltip="Move the selected device to the token role, pinned"),
        Binding("x", "assign('mixed')", "→mixed", tooltip="Move the selected device to the mixed role, pinned"),
        Binding("P,shift+p", "assign('prompt', 'drain')", "→prompt (drain)", show=False,
                tooltip="The same as p, in drain mode"),
        Binding("T,shift+t", "assign('token', 'drain')", "→token (drain)", show=False,
                tooltip="The same as t, in drain mode"),
        Binding("X,shift+x", "assign('mixed', 'drain')", "→mixed (drain)", show=False,
                tooltip="The same as x, in drain mode"),
        Binding("d", "toggle_mode", "Migrate/drain", tooltip="Toggle how p, t and x move: migrate or drain"),
        Binding("r", "release", "Unpin", tooltip="Release the pin: the autoscaler may move the device again"),
        Binding("l", "toggle_load", "Load", tooltip="Start / stop the built-in load generator"),
        Binding("plus,equals_sign", "load_rate(1)", "Rate+", key_display="+",
                tooltip="Load rate up (requests per second)"),
        Binding("minus", "load_rate(-1)", "Rate-", key_display="-", tooltip="Load rate down"),
    ]

    mode: reactive[str] = reactive("migrate")
    load_on: reactive[bool] = reactive(False)
    sample: reactive[dict | None] = reactive(None, always_update=True)
    error: reactive[str | None] = reactive(None)

    def __init__(self, backend: Backend, poll_s: float = 0.25, load: bool = False, load_rate: float = 4.0,
                 clock=time.monotonic):
        super().__init__()
        self.clock = clock  # when each sample was taken, for the rates; tests fix it
        self._load_at_start = load
        self.backend = backend
        self.poll_s = poll_s
        self.load = LoadGenerator(backend, rate=load_rate)
        self.rates = Rates()
        self._session = backend.session
        self._notifier: _Notifier | None = None
        self._warned: set[str] = set()
        self._panes: Panes | None = None  # see `panes`

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        yield DataTable(id="devices", cursor_type="row")
        with Horizontal(id="panels"):
            yield Static(id="pools", classes="panel")
            yield Static(id="transfers", classes="panel")
            yield Static(id="requests", classes="panel")
        yield DataTable(id="in-flight", cursor_type="none", zebra_stripes=True)
        yield Static(id="prediction")
        yield Footer()

    def on_mount(self) -> None:
        devices = self.query_one("#devices", DataTable)
        for key, label, width in COLUMNS:
            devices.add_column(label, width=width, key=key)
        in_flight = self.query_one("#in-flight", DataTable)
        for label in ("REQUEST", "TTFT ms", "E2E so far s", "TBT mean ms", "TBT max ms"):
            in_flight.add_column(label)
        self.query_one("#pools").border_title = "pools"
        self.query_one("#transfers").border_title = "KV transfers"
        self.query_one("#requests").border_title = "requests"
        in_flight.border_title = "in flight"
        self._panes = Panes(self.query_one("#header", Static), devices, self.query_one("#pools", Static),
                            self.query_one("#transfers", Static), self.query_one("#requests", Static), in_flight,
                            self.query_one("#prediction", Static))
        devices.focus()
        self._notifier = _Notifier(self, asyncio.get_running_loop())
        logging.getLogger("splitnode").addHandler(self._notifier)
        self.poll_status()
        self.load_on = self._load_at_start

    def on_unmount(self) -> None:
        logging.getLogger("splitnode").removeHandler(self._notifier)

    @property
    def panes(self) -> Panes | None:
        """The widgets to show samples in, or None while they may not be there: before they are
        mounted, and once the app has begun to shut down. `App._shutdown` (leaving run_test, say)
        clears `is_running` first, then removes the screens while the message loop still runs, and
        the poll worker, cancelled only when that loop ends, can still post a sample or a failure
        whose new text would redraw the header. Every update goes through here, so none reaches a
        widget that is gone."""
        return self._panes if self.is_running else None

    # -- reading --------------------------------------------------------------------------------------

    @work(exclusive=True, group="poll")
    async def poll_status(self) -> None:
        while True:
            try:
                status = await self.backend.status()
            except Exception as e:  # the server went away, say: show it, keep trying
                self.post_message(StatusFailed(str(e) or type(e).__name__))
            else:
                self.post_message(StatusSampled(status, self.clock(), self.backend.session))
            await asyncio.sleep(self.poll_s)

    @on(StatusSampled)
    def _on_status(self, message: StatusSampled) -> None:
        if self.panes is None:  # shutting down: nothing more to show or say
            return
        if message.session != self._session:  # reattached: the new server's counters start over
            self._session = message.session
            self.rates = Rates()
        self.rates.add(message.t, message.status)
        self.error = None
        for warning in (message.status.get("runtime") or {}).get("warnings") or []:
            if warning not in self._warned:  # e.g. CPU workers sharing cores: said once, as a toast
                self._warned.add(warning)
                self.notify(warning, title="runtime", severity="warning", timeout=12)
        self.sample = message.status

    @on(StatusFailed)
    def _on_status_failed(self, message: StatusFailed) -> None:
        if self.panes is None:
            return
        if self.error is None:
            self.notify(message.error, title="status failed", severity="error")
        self.error = message.error

    def watch_sample(self, status: dict | None) -> None:
        panes = self.panes
        if status is None or panes is None:
            return
        self._show_devices(panes.devices, status)
        panes.pools.update(pools_lines(status))
        panes.transfers.update(transfers_lines(status, self.rates))
        panes.requests.update(requests_lines(status, self.rates))
        self._show_in_flight(panes.in_flight, status)
        # an older server sends no prediction: no line for it
        panes.prediction.display = "prediction" in status
        panes.prediction.update(prediction_line(status))
        self._show_header()

    def _show_devices(self, table: DataTable, status: dict) -> None:
        rows = {dev["name"]: device_cells(dev, self.rates.device_rate(dev["name"], lambda d: d["busy_s"]))
                for dev in status["devices"]}
        if [row.key.value for row in table.ordered_rows] != list(rows):
            # The first sample, or reattached to a server with other devices: rows kept from the old
            # one would be acted on as devices the new server does not have.
            selected = self.selected_device()
            table.clear()
            for name, cells in rows.items():
                table.add_row(*(cells[key] for key, _, _ in COLUMNS), key=name)
            if selected in rows:
                table.move_cursor(row=list(rows).index(selected))
            return
        for name, cells in rows.items():
            for key, _, width in COLUMNS:
                table.update_cell(name, key, cells[key], update_width=width is None)

    def _show_in_flight(self, table: DataTable, status: dict) -> None:
        table.clear()

        def ms(m: dict, key: str) -> str:
            return "-" if key not in m else f"{m[key] * 1000:.0f}"

        for r in status["requests"]["in_flight"][:MAX_IN_FLIGHT_ROWS]:
            table.add_row(str(r["request_id"]), ms(r, "ttft_s"),
                          "-" if "e2e_s" not in r else f"{r['e2e_s']:.2f}", ms(r, "tbt_mean_s"), ms(r, "tbt_max_s"))

    def _show_header(self) -> None:
        panes = self.panes
        if self.sample is None or panes is None:
            return
        load = (f"on, {self.load.rate:g} req/s (sent {self.load.num_sent}, done {self.load.num_done}, "
                f"failed {self.load.num_failed})" if self.load_on else f"off ({self.load.rate:g} req/s; l starts)")
        text = header_text(self.sample, self.backend.where, self.mode, load)
        if self.error:
            text.append(f"   disconnected: {self.error}", style="bold red")
        panes.header.update(text)

    def watch_mode(self) -> None:
        self._show_header()

    def watch_error(self) -> None:
        self._show_header()

    # -- acting -----------------------------------------------------------------------------------------

    def selected_device(self) -> str | None:
        table = self.query_one("#devices", DataTable)
        if not table.is_valid_row_index(table.cursor_row):
            return None
        return table.ordered_rows[table.cursor_row].key.value

    def action_cursor(self, step: int) -> None:
        table = self.query_one("#devices", DataTable)
        table.move_cursor(row=table.cursor_row + step)

    def action_assign(self, role: str, mode: str | None = None) -> None:
        device = self.selected_device()
        if device is not None:
            self.run_assign(device, role, mode or self.mode)

    @work(group="assign")
    async def run_assign(self, device: str, role: str, mode: str) -> None:
        try:
            await self.backend.assign(device, role, mode=mode, pin=True)
        except Exception as e:  # refused (ValueError with the runtime's reason) or the link failed
            self.notify(getattr(e, "message", None) or str(e), title=f"{device} → {role} refused",
                        severity="error", timeout=8)
            return
        self.notify(f"{device} is now {role} (pinned; r releases)", title="role changed")

    def action_release(self) -> None:
        device = self.selected_device()
        if device is not None:
            self.run_release(device)

    @work(group="assign")
    async def run_release(self, device: str) -> None:
        try:
            await self.backend.release(device)
        except Exception as e:
            self.notify(str(e), title=f"release {device} failed", severity="error")
            return
        self.notify(f"{device} released: the autoscaler may move it", title="unpinned")

    def action_toggle_mode(self) -> None:
        self.mode = "drain" if self.mode == "migrate" else "migrate"

    def action_toggle_load(self) -> None:
        self.load_on = not self.load_on

    def watch_load_on(self, on: bool) -> None:
        if on:
            self.run_load()
        else:
            self.workers.cancel_group(self, "load")
        self._show_header()

    @work(exclusive=True, group="load")
    async def run_load(self) -> None:
        await self.load.run()

    def action_load_rate(self, step: int) -> None:
        rate = self.load.faster() if step > 0 else self.load.slower()
        self.notify(f"{rate:g} requests/s", title="load rate", timeout=2)
        self._show_header()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.BINDINGS))
