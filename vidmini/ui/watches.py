"""The Watches page: the live watches of the data home (their state, pause/resume/remove), a form to add one, the
latest frames of a chosen watch, and the alert feed of all of them — everything through the service
(`vidmini.service.watch_view`, `vidmini.service.watches`).

The watches run in this process on the app's Library. Standalone (`streamlit run`, `make run`) the app runs them:
`start_watches` (every run of the page; or `watches_lifespan` from the server's start) starts the manager once
(`run_watches`). Inside `vidmini serve --app` ($VIDMINI_APP_IN_SERVE set) the serve command runs them, or not with
`--no-watches`: the page only shows the manager it started on the same Library (`running_watches`).
Three fragments redraw themselves: the list every `LIST_POLL_S`, the live frames and the alert feed every
`LIVE_POLL_S` (their buttons rerun only their fragment). Nothing here reruns the whole page on its own: a click
or a form submit made while the page itself started a full rerun could be lost. Times are shown in the
browser's time zone (`st.context.timezone`).
"Ask about a watch" asks a question over a span of a watch's recording (`ask_watch`): the span's ends typed as
durations back from now ('10m', '2h ago') or date-times, one without a zone read in the browser's zone.
"""

from __future__ import annotations

import base64
import html
import os
import time
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone, tzinfo
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import streamlit as st

from vidmini.service.library import Library, shared_library
from vidmini.service.watch_view import (
    ALERTS_SHOWN,
    LIVE_FRAMES,
    WatchRow,
    add_watch,
    alerts_version,
    clip_name,
    latest_frames,
    new_watch_spec,
    pause_watch,
    recent_alerts,
    remove_watch,
    watch_folders,
    watch_names,
    watch_rows,
)
from vidmini.service.watches import WatchError, ask_watch, run_watches, running_watches
from vidmini.ui.routes import CLIP_PATH

LIST_POLL_S = 3.0
LIVE_POLL_S = 2.0
SUCCESS_SHOWN_S = 15.0  # "watch added" stays this long, however often the page is drawn again
STATE_COLOUR = {"recording": "green", "starting": "blue", "connecting": "blue", "backoff": "orange", "paused": "gray",
                "pausing": "gray", "stopped": "gray", "failed": "red"}
FORM_KEYS = ("wf-name", "wf-source", "wf-rules", "wf-retain", "wf-fps", "wf-hook", "wf-secret", "wf-mqtt")
FORM_DEFAULTS = {"wf-retain": "24h", "wf-fps": 1.0}
IN_SERVE_ENV = "VIDMINI_APP_IN_SERVE"  # set by `vidmini serve --app`: the serve command decides whether watches run


def _md(text: str) -> str:
    """Text shown in markdown as it is (as `page._md`; this module may not import the page: no import cycles)."""
    return "".join("\\" + c if c in "\\`*_{}[]<>|~:$" else c for c in text)


def human_bytes(n: int | None) -> str:
    if not n:
        return "0 B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def runs_watches() -> bool:
    """Whether the app starts the watches itself (standalone), not `vidmini serve --app`'s command."""
    return not os.environ.get(IN_SERVE_ENV)


def start_watches(lib: Library) -> str | None:
    """The Library's watches running (once per process and Library), when the app runs them; an error message
    when they cannot be started."""
    if not runs_watches():
        return None
    try:
        run_watches(lib)
    except (OSError, ValueError) as e:
        return f"the watches could not be started: {e}"
    return None


@asynccontextmanager
async def watches_lifespan(app):
    """For `st.App(..., lifespan=watches_lifespan)`: the watches run from the server's start (not only once a
    page is opened), and the ones started here stop cleanly with the server."""
    lib = shared_library()
    started = runs_watches() and running_watches(lib) is None
    manager = run_watches(lib) if started else None
    try:
        yield None
    finally:
        if manager is not None:
            manager.close()


# ---- times in the browser's zone ------------------------------------------------------------------------------
def browser_zone() -> tzinfo | None:
    """The browser's time zone (its IANA name, else its UTC offset); None: the server's."""
    name = getattr(st.context, "timezone", None)
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    offset = getattr(st.context, "timezone_offset", None)
    if isinstance(offset, (int, float)):
        return timezone(-timedelta(minutes=offset))
    return None


def zone_label() -> str:
    zone = browser_zone()
    return getattr(st.context, "timezone", None) or (str(zone) if zone is not None else "the server's time zone")


def local_time(iso: str | None, with_date: bool = True) -> str:
    """An ISO 8601 time (with its zone) as a person reads it in the browser's zone; '-' for none."""
    if not iso:
        return "-"
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    t = t.astimezone(browser_zone())
    return t.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


# ---- the list ---------------------------------------------------------------------------------------------------
def _messages() -> list[tuple[str, str]]:
    return st.session_state.setdefault("vm_watch_messages", [])


def _pause(lib: Library, name: str, paused: bool) -> None:
    try:
        pause_watch(lib, name, paused)
    except (WatchError, OSError) as e:
        _messages().append(("error", f"{name}: {e}"))


def _ask_remove(name: str | None) -> None:
    st.session_state["vm_watch_remove"] = name


def _remove(lib: Library, name: str) -> None:
    st.session_state["vm_watch_remove"] = None
    try:
        remove_watch(lib, name)
        _messages().append(("success", f"removed watch {name} and its recordings"))
    except (WatchError, OSError) as e:
        _messages().append(("error", f"could not remove {name}: {e}"))


def _retention(row: WatchRow) -> str:
    bits = []
    if row.retain_s:
        h = row.retain_s / 3600
        bits.append(f"{h:g} h" if h >= 1 else f"{row.retain_s / 60:g} min")
    if row.retain_bytes:  # in the decimal units it was given in (5GB: 5·10⁹ bytes)
        bits.append(f"{row.retain_bytes / 1e9:g} GB" if row.retain_bytes >= 10**9 else f"{row.retain_bytes / 1e6:g} MB")
    return " / ".join(bits) or "-"


ROW_LINE = ("white-space:nowrap;overflow:hidden;text-overflow:ellipsis;font-size:0.875rem;line-height:1.5;"
            "opacity:0.65")


def row_lines(row: WatchRow) -> str:
    """A watch's source and numbers, a line each that never wraps (cut with an ellipsis, whole in its tooltip):
    the row keeps its height while the numbers change every few seconds, so nothing below it moves under a
    pointer about to click."""
    lines = [f"{row.source} · {row.fps:g} fps · keeps {_retention(row)}"
             + (f" · alerts to {', '.join(row.sinks)}" if row.sinks else ""),
             f"{row.frames} frames judged · {row.alerts} alerts",
             f"last frame {local_time(row.last_frame)}",
             f"{human_bytes(row.disk_bytes)} on disk · {row.segments} segments · {row.gaps} outages"]
    return "".join(f'<div class="vm-watch-line" style="{ROW_LINE}" title="{html.escape(line)}">{html.escape(line)}'
                   "</div>" for line in lines)


def watch_row(lib: Library, row: WatchRow) -> None:
    """One watch: its buttons at the top right (drawn first, so they stay put while its numbers change)."""
    confirm = st.session_state.get("vm_watch_remove") == row.name
    with st.container(border=True, key=f"watch-{row.name}"):
        left, mid, right = st.columns([6, 2, 2], vertical_alignment="top")
        with mid:
            if row.paused:
                st.button("Resume", key=f"resume-{row.name}", width="stretch", on_click=_pause,
                          args=(lib, row.name, False))
            else:
                st.button("Pause", key=f"pause-{row.name}", width="stretch", on_click=_pause,
                          args=(lib, row.name, True))
        with right:
            if confirm:
                st.button("Yes, remove", key=f"rm-yes-{row.name}", type="primary", width="stretch",
                          on_click=_remove, args=(lib, row.name))
                st.button("Cancel", key=f"rm-no-{row.name}", width="stretch", on_click=_ask_remove, args=(None,))
            else:
                st.button("Remove", key=f"rm-{row.name}", width="stretch", on_click=_ask_remove, args=(row.name,))
        with left:
            colour = STATE_COLOUR.get(row.state, "gray")
            opened = " ".join(f":orange-badge[open · {_md(e)}]" for e in row.open_events)
            st.markdown(f"**{_md(row.name)}** :{colour}-badge[{row.state}] {opened}")
            st.html(row_lines(row))
            st.caption("rules: " + ("; ".join(_md(r) for r in row.rules) if row.rules else "none (recording only)"))
            if confirm:
                st.warning(f"Remove {_md(row.name)} and everything it recorded (segments, clips, alerts)?")
            if row.error:
                st.error(f"{_md(row.name)}: {_md(row.error)}")


def watch_list(lib: Library) -> None:
    messages = _messages()
    for kind, text in messages:
        getattr(st, kind)(text)
    messages.clear()
    rows = watch_rows(lib)
    if not rows:
        st.info("No watches yet: add a camera or stream below.")
    for row in rows:
        watch_row(lib, row)
    if rows and running_watches(lib) is None:
        st.warning("The watches are not running in this server (`vidmini serve --no-watches`?): changes made here "
                   "are saved, and `vidmini watch run` (or a `vidmini serve`) runs them." if not runs_watches() else
                   "The watches are not running: see the server's log.")


# ---- adding one -----------------------------------------------------------------------------------------------
def _add(lib: Library) -> None:
    """The form's submit callback: the watch is saved, or one line says why not (and nothing is saved)."""
    s = st.session_state
    try:
        spec = new_watch_spec(s.get("wf-name", ""), s.get("wf-source", ""), s.get("wf-rules", ""),
                              s.get("wf-retain", ""), s.get("wf-fps", 1.0), s.get("wf-hook", ""),
                              s.get("wf-secret", ""), s.get("wf-mqtt", ""))
        add_watch(lib, spec)
    except (WatchError, OSError) as e:
        s["vm_watch_form"] = ("error", " ".join(str(e).split()), time.monotonic())
        return
    s["vm_watch_form"] = ("success", f"watch {spec.name} added: it starts within a few seconds", time.monotonic())
    for key in FORM_KEYS:  # a fresh form for the next one
        s[key] = FORM_DEFAULTS.get(key, "")


def add_form(lib: Library) -> None:
    for key, value in FORM_DEFAULTS.items():
        st.session_state.setdefault(key, value)
    with st.form("add-watch", border=True):
        st.markdown("**Add a watch**")
        a, b = st.columns([1, 2])
        a.text_input("Name", key="wf-name", placeholder="front-door", help="letters, digits, - and _")
        b.text_input("Source URL", key="wf-source", placeholder="rtsp://camera.local/stream",
                     help="RTSP, HTTP(S)/HLS, SRT, UDP, TCP, RTMP, or a file being written")
        st.text_area("Rules, one per line", key="wf-rules", height=80,
                     placeholder="a person at the door\na car in the driveway",
                     help="each line an event to alert on; none: recording only")
        c, d = st.columns(2)
        c.text_input("Keep the recording for", key="wf-retain", help="a duration (24h, 90m, 2d), a size (5GB) or "
                     "both (24h / 5GB)")
        d.number_input("Frames judged per second", key="wf-fps", min_value=0.05, max_value=30.0, step=0.5)
        e, f, g = st.columns(3)
        e.text_input("Webhook URL (optional)", key="wf-hook", placeholder="https://example.com/hook")
        f.text_input("Webhook secret", key="wf-secret", type="password", help="the HMAC key the alerts are signed with")
        g.text_input("MQTT broker (optional)", key="wf-mqtt", placeholder="broker.local:1883")
        st.form_submit_button("Add watch", on_click=_add, args=(lib,))
    got = st.session_state.get("vm_watch_form")
    if got:  # an error stays until the next submit; a success for SUCCESS_SHOWN_S, however often the page redraws
        kind, text, since = got
        if kind == "success" and time.monotonic() - since > SUCCESS_SHOWN_S:
            del st.session_state["vm_watch_form"]
        else:
            getattr(st, kind)(text)


# ---- asking about a watch -----------------------------------------------------------------------------------
def span_end(text: str | None, zone: tzinfo | None = None) -> str | datetime | None:
    """One end of a span as typed, for the service: empty → None (open); a date-time without a zone → that time
    in the browser's zone (`zone`, else `browser_zone()`; the server's when the browser's is unknown); anything
    else (a duration back from now, 'now', a date-time with its zone, or a mistake the service names) as it is."""
    s = (text or "").strip()
    if not s:
        return None
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        return s
    if t.tzinfo is None or t.utcoffset() is None:
        zone = zone or browser_zone()
        t = t.replace(tzinfo=zone) if zone is not None else t.astimezone()
    return t


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def span_text(answer) -> str:
    return (f"{local_time(answer.since)} → {local_time(answer.until)} ({_md(zone_label())}) · "
            f"{answer.frames} frames")


def _show_answer(got: dict) -> None:
    if got.get("error"):
        st.error(got["error"])
        return
    st.markdown(_md(got["text"]) if got["text"].strip() else "_(empty answer)_")
    st.caption(got["span"])


def _ask(lib: Library, name: str | None, question: str, since: str | None, until: str | None) -> dict:
    """Asks with the answer streamed into the page; the answer's record, or its error in one line."""
    got: dict = {"question": question}
    asking = None
    try:
        if not name:
            raise WatchError("no watch to ask about")
        asking = ask_watch(lib, name, question, since=span_end(since), until=span_end(until),
                           folders=watch_folders(lib))
        st.write_stream(asking.text())
        answer = asking.result()
        asking = None
        if not answer.text.strip():
            st.markdown("_(empty answer)_")
    except (WatchError, RuntimeError, ValueError, OSError) as e:
        got["error"] = _one_line(e)
        return got
    finally:
        if asking is not None:  # failed, or the page was rerun while it streamed: the model stops on it
            try:
                asking.cancel()
            except Exception:  # noqa: BLE001 - only tidying up
                pass
    got.update(text=answer.text, span=span_text(answer))
    return got


def ask_form(lib: Library) -> None:
    """Pick a watch, a question and a span; the answer streams in below, then the span and the frames it saw."""
    names = watch_names(lib)
    if st.session_state.get("aw-watch") not in names:  # none yet, or it was removed: the first one
        st.session_state["aw-watch"] = names[0] if names else None
    with st.form("ask-watch", border=True):
        st.markdown("**Ask about a watch**")
        st.selectbox("Watch to ask about", names, key="aw-watch", placeholder="no watches yet")
        st.text_input("Question", key="aw-question", placeholder="What happened at the door?")
        a, b = st.columns(2)
        a.text_input("Since", key="aw-since", placeholder="10m", help="a duration back from now (10m, 2h ago) or "
                     f"a date-time (2026-12-04 09:30, in {zone_label()} unless it has its zone); empty: the start")
        b.text_input("Until", key="aw-until", placeholder="now", help="as Since; empty: the newest frame")
        asked = st.form_submit_button("Ask")
    s = st.session_state
    if asked:
        s.pop("vm_watch_answer", None)
        with st.container(key="watch-answer"):
            got = _ask(lib, s.get("aw-watch"), s.get("aw-question", ""), s.get("aw-since"), s.get("aw-until"))
            if got.get("error"):
                st.error(got["error"])
            else:
                st.caption(got["span"])
        s["vm_watch_answer"] = got
    elif "vm_watch_answer" in s:  # the last answer stays while the page is redrawn
        with st.container(key="watch-answer"):
            _show_answer(s["vm_watch_answer"])


# ---- live frames ------------------------------------------------------------------------------------------------
def live_view(lib: Library) -> None:
    names = watch_names(lib)
    if not names:
        st.caption("the latest frames of a watch show here")
        return
    name = st.selectbox("Watch", names, key="vm-live-watch")
    if name not in names:
        return
    try:
        frames = latest_frames(lib, name, LIVE_FRAMES)
    except (WatchError, OSError) as e:
        st.caption(str(e))
        return
    if not frames:
        st.caption(f"no frames from {_md(name)} yet (they show once it records and its first frames are ingested)")
        return
    cells = "".join(
        f'<figure class="vm-live-frame" data-time="{html.escape(f.time)}" style="flex:1;min-width:0;margin:0;'
        f'text-align:center"><img src="data:image/jpeg;base64,{base64.b64encode(f.jpeg).decode()}" '
        f'style="width:100%;display:block"/><figcaption style="font-size:0.75em">{local_time(f.time, False)}'
        '</figcaption></figure>' for f in frames)
    st.html(f'<div class="vm-live" data-watch="{html.escape(name)}" style="display:flex;gap:4px">{cells}</div>')
    st.caption(f"newest {local_time(frames[-1].time)} ({_md(zone_label())})")


# ---- the alert feed ---------------------------------------------------------------------------------------------
def alert_html(lib: Library, alert) -> str:
    kind_colour = {"new": "#d33", "update": "#e80", "end": "#2a2"}.get(alert.kind, "#888")
    when = local_time(alert.start)
    if alert.kind == "end" and alert.end:
        when += f" → {local_time(alert.end, with_date=False)}"
    thumb = (f'<img class="vm-alert-thumb" src="data:image/jpeg;base64,{base64.b64encode(alert.thumbnail).decode()}"'
             ' style="width:120px;flex:none;border-radius:4px"/>' if alert.thumbnail else
             '<div style="width:120px;flex:none"></div>')
    clip = ""
    name = clip_name(lib, alert)
    if name:
        src = f"{CLIP_PATH}/{quote(alert.watch)}/{quote(name)}?token={quote(lib.upload_token)}"
        clip = (f'<video class="vm-alert-clip" controls preload="metadata" src="{html.escape(src)}" '
                'style="display:block;width:100%;max-width:400px;margin-top:6px;border-radius:4px"></video>')
    elif alert.clip_path:
        clip = f'<div style="font-size:0.8em">clip {html.escape(alert.clip_path)} (not found)</div>'
    return (f'<div class="vm-alert" data-key="{html.escape(alert.key)}" data-kind="{alert.kind}" '
            f'data-start="{html.escape(alert.start)}" style="padding:6px 0;'
            'border-bottom:1px solid rgba(128,128,128,0.3)">'
            f'<div style="display:flex;gap:10px;align-items:flex-start">{thumb}<div style="flex:1;min-width:0">'
            f'<div><span class="vm-alert-time" style="font-weight:600">{html.escape(when)}</span> '
            f'<span class="vm-alert-kind" style="color:#fff;background:{kind_colour};border-radius:4px;'
            f'padding:0 6px;font-size:0.85em">{alert.kind}</span></div>'
            f'<div><span class="vm-alert-watch">{html.escape(alert.watch)}</span> · '
            f'<span class="vm-alert-rule">{html.escape(alert.rule)}</span> · '
            f'confidence <span class="vm-alert-confidence">{alert.confidence:.2f}</span></div></div></div>'
            f'{clip}</div>')


def alert_feed(lib: Library) -> None:
    """The feed, in a fragment that redraws only itself every `LIVE_POLL_S`: an alert arriving never reruns the
    whole page (a full rerun started by the page itself can swallow a click or a form submit made at that
    moment). The feed is one HTML block, rebuilt only when `alerts_version` changed; the same block sent again
    is a cached reference (Streamlit's message cache), so the thumbnails are not sent every few seconds."""
    version = alerts_version(lib)  # before reading: a change in between shows next time
    drawn = st.session_state.get("vm_alert_feed")
    if drawn is None or drawn[0] != version:
        alerts = recent_alerts(lib, ALERTS_SHOWN)
        drawn = (version, "".join(alert_html(lib, alert) for alert in alerts))
        st.session_state["vm_alert_feed"] = drawn
    if not drawn[1]:
        st.caption("no alerts yet")
        return
    st.caption(f"newest first · times in {_md(zone_label())}")
    st.html(f'<div class="vm-alerts">{drawn[1]}</div>')


# ---- the page ---------------------------------------------------------------------------------------------------
def watches_page(lib: Library) -> None:
    st.title("Watches")
    st.caption("Cameras and streams watched around the clock: every frame judged against the watch's rules, "
               "alerts with a thumbnail and a clip, delivered to webhooks and MQTT.")
    left, right = st.columns([3, 2], gap="large")
    with left:
        st.subheader("Watches")
        st.fragment(watch_list, run_every=LIST_POLL_S)(lib)
        add_form(lib)
        ask_form(lib)
    with right:
        st.subheader("Live")
        st.fragment(live_view, run_every=LIVE_POLL_S)(lib)
        st.subheader("Alerts")
        st.fragment(alert_feed, run_every=LIVE_POLL_S)(lib)
