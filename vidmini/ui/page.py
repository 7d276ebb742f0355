"""The Streamlit UI: a thin layer over `vidmini.service.library.Library` (the calls the CLI makes).

One Library (and so one model) per process through `st.cache_resource`; everything about one browser tab —
the open video, its chat, the player position, search results — lives in `st.session_state`.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import streamlit as st

from vidmini.common.keys import ApiKeys
from vidmini.common.paths import data_home
from vidmini.common.timefmt import clock, span
from vidmini.service.asking import times_in_question
from vidmini.service.library import Library, LibraryError, SearchResult, VideoRow, shared_library
from vidmini.service.options import AskOptions, IngestOptions
from vidmini.ui import watches
from vidmini.ui.app import KEY_FILE_ENV
from vidmini.ui.routes import MEDIA_PATH, UPLOAD_PATH

TIMELINE_THUMBS = 16
SEARCH_K = 8
FRAMES_SHOWN = 8  # timestamp links under an answer, out of the frames it used
POLL_S = 1.0  # while an ingest runs, the library list redraws this often; with none running it stays still
MOMENT_COLOUR = {"seen": ("rgba(255,140,0,0.45)", "#ff8c00"), "heard": ("rgba(30,144,255,0.40)", "#1e90ff"),
                 "both": ("rgba(148,0,211,0.40)", "#9400d3")}  # timeline marks: fill, border
TRANSCRIPT_NOTE = {"running": "transcribing the audio…", "no_audio": "this video has no audio track",
                   "failed": "the audio could not be transcribed", "none": "no transcript (ingested with --no-audio?)"}
STATUS_COLOUR = {"ready": "green", "ingesting": "blue", "queued": "gray", "failed": "red", "incomplete": "orange",
                 "cancelled": "gray"}


@st.cache_resource(show_spinner=False)
def get_library(root: str) -> Library:
    """The process's Library for a data root (shared with the upload/media routes)."""
    return shared_library(root)


@dataclass
class TabState:
    """What one browser tab is looking at."""

    page: str = "library"  # library | video | watches
    video_id: str | None = None
    chats: dict[str, list[dict]] = field(default_factory=dict)
    seek: dict[str, float] = field(default_factory=dict)
    seek_nonce: int = 0
    searches: dict[str, SearchResult] = field(default_factory=dict)
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, message) shown once on the next run
    listed: tuple = ()  # what the library list last showed (`library_watch` compares the library with it)


def tab_state() -> TabState:
    if "vidmini" not in st.session_state:
        st.session_state["vidmini"] = TabState()
    return st.session_state["vidmini"]


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ---- actions (button callbacks: run before the page reruns) ---------------------------------------------------
def _seek(video_id: str, t: float) -> None:
    state = tab_state()
    state.seek[video_id] = float(t)
    state.seek_nonce += 1


def _open(video_id: str) -> None:
    state = tab_state()
    state.page, state.video_id = "video", video_id


def _back() -> None:
    tab_state().page = "library"


def _go(page: str) -> None:
    tab_state().page = page


def nav(state: TabState) -> None:
    """The app's two pages, in the sidebar: the library (and its videos) and the live watches."""
    here = "watches" if state.page == "watches" else "library"
    a, b = st.columns(2)
    a.button("Library", key="nav-library", width="stretch", type="primary" if here == "library" else "secondary",
             on_click=_go, args=("library",))
    b.button("Watches", key="nav-watches", width="stretch", type="primary" if here == "watches" else "secondary",
             on_click=_go, args=("watches",))


def _delete(lib: Library, row: VideoRow) -> None:
    state = tab_state()
    try:
        lib.remove(video_id=row.video_id, job_id=None if row.video_id else row.job_id)
        state.flash.append(("success", f"deleted {row.name}"))
        if state.video_id == row.video_id:
            state.page, state.video_id = "library", None
    except (LibraryError, OSError, RuntimeError) as e:
        state.flash.append(("error", f"could not delete {row.name}: {e}"))


def timestamp_button(video_id: str, t: float, key: str, label: str | None = None) -> None:
    """A timestamp that seeks this tab's player to `t` when clicked."""
    st.button(label or f"▶ {clock(t)}", key=key, on_click=_seek, args=(video_id, t), type="tertiary",
              help=f"play from {clock(t)}")


# ---- sidebar: the model --------------------------------------------------------------------------------------
def model_panel(lib: Library) -> None:
    st.subheader("Model")
    try:
        with st.spinner("loading the model…"):
            info = lib.model_info()
    except LibraryError as e:
        st.error(str(e))
        info = None
    if info is not None:
        st.markdown(f"**{html.escape(info.name)}**")
        if info.is_random:
            st.warning("A tiny RANDOM-WEIGHT model: its answers are meaningless.")
        elif info.is_demo:
            st.info(info.notice or "A demo model trained only on the synthetic world: it answers questions "
                    "about that world's shapes, words and colours, not about real videos.")
        st.caption(f"device **{info.device}** · {info.dtype} · {info.parameters / 1e6:.1f} M parameters "
                   f"({human_bytes(info.parameter_bytes)})")
        mem = f"process memory {human_bytes(info.process_rss_bytes)}"
        if info.device_memory_bytes is not None:
            mem += f" · GPU memory {human_bytes(info.device_memory_bytes)}"
        st.caption(mem + ("" if info.searchable else " · search unavailable (no text tower)"))
    with st.form("load-model", clear_on_submit=False, border=False):
        target = st.text_input("Load another model", placeholder="checkpoint folder or Hugging Face id",
                               help="A folder in the LLaVA-Mini checkpoint format, or an id already in the "
                                    "Hugging Face cache (`vidmini download`). Empty: the default model.")
        if st.form_submit_button("Load model"):
            try:
                with st.spinner("loading…"):
                    got = lib.load_model(target or None)
                st.success(f"loaded {got.name}")
            except LibraryError as e:
                st.error(str(e))


# ---- the library page -----------------------------------------------------------------------------------------
def upload_widget(lib: Library) -> None:
    """A file picker that streams the chosen files to /vidmini/upload (PUT, the File object as the body:
    the browser sends it from disk; the server writes it to disk piece by piece)."""
    token = json.dumps(lib.upload_token)
    st.html(f"""
<div class="vm-upload" style="border:1px dashed #999;border-radius:8px;padding:10px 12px">
  <label for="vm-file" style="font-weight:600">Upload videos</label>
  <input type="file" id="vm-file" data-testid="vm-file" multiple
         accept="video/*,.mp4,.mkv,.mov,.avi,.webm,.ts,.m4v" style="display:block;margin:6px 0">
  <div id="vm-uploads" style="font-size:0.9em"></div>
</div>
<script>
(function() {{
  const input = document.getElementById("vm-file");
  if (!input || input.dataset.bound) return;
  input.dataset.bound = "1";
  const list = document.getElementById("vm-uploads");
  function send(file) {{
    const row = document.createElement("div");
    row.className = "vm-upload-row";
    row.style.cssText = "white-space:nowrap;overflow:hidden;text-overflow:ellipsis";  // one line: no wrap moves the list
    const bar = document.createElement("progress");
    bar.max = 1; bar.value = 0; bar.style.width = "40%";
    const msg = document.createElement("span");
    msg.className = "vm-upload-msg";
    msg.textContent = " " + file.name + ": uploading…";
    row.append(bar, msg); list.append(row);
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", "{UPLOAD_PATH}?name=" + encodeURIComponent(file.name));
    xhr.setRequestHeader("X-Vidmini-Token", {token});
    xhr.upload.onprogress = (e) => {{ if (e.lengthComputable) bar.value = e.loaded / e.total; }};
    xhr.onload = () => {{
      let body = {{}};
      try {{ body = JSON.parse(xhr.responseText); }} catch (e) {{}}
      if (xhr.status >= 200 && xhr.status < 300) {{
        bar.value = 1;
        msg.textContent = " " + file.name + ": uploaded, ingesting (see the list below)";
        row.dataset.state = "done";
      }} else {{
        msg.textContent = " " + file.name + ": upload failed: " + (body.error || xhr.status);
        row.dataset.state = "error";
      }}
    }};
    xhr.onerror = () => {{ msg.textContent = " " + file.name + ": upload failed (connection)"; row.dataset.state = "error"; }};
    xhr.send(file);
  }}
  input.addEventListener("change", () => {{ for (const f of input.files) send(f); input.value = ""; }});
}})();
</script>""", unsafe_allow_javascript=True)


def add_by_path(lib: Library) -> None:
    with st.form("add-path", clear_on_submit=True, border=False):
        source = st.text_input("Add a file on the server, or a stream URL",
                               placeholder="/data/videos/lecture.mp4  or  rtsp://camera.local/stream")
        live = st.checkbox("still being recorded (follow the file until it stops growing)")
        if st.form_submit_button("Add"):
            try:
                job = lib.add(source, IngestOptions(live=live))
                st.success(f"ingesting {job.name}")
            except LibraryError as e:
                st.error(str(e))


def video_row(lib: Library, row: VideoRow, row_key: str) -> None:
    """One line of the list. Its place, its container's key and its buttons' places stay put when the row's ingest
    ends (a click aimed at "Open" as it turns usable must land on it): `row_key` is the same before and after,
    and the buttons sit at the top of the row, not centred on a text that loses its progress bar. The buttons
    are drawn before the text, so the row never says "ready" while its Open button is still disabled."""
    ident = row.video_id or row.job_id or "x"
    with st.container(border=True, key=f"row-{row_key}"):
        left, mid, right = st.columns([5, 2, 2], vertical_alignment="top")
        # callbacks: the click acts on the row it was made on, whatever the run that handles it lists; in the
        # fragment a button reruns only the fragment, which then asks for the whole page (see library_list)
        with mid:
            st.button("Open", key=f"open-{ident}", disabled=not row.usable, width="stretch", on_click=_open,
                      args=(row.video_id,))
        with right:
            st.button("Delete", key=f"del-{ident}", width="stretch", on_click=_delete, args=(lib, row))
        with left:
            colour = STATUS_COLOUR.get(row.status, "gray")
            st.markdown(f"**{_md(row.name)}** :{colour}-badge[{row.status}]")
            bits = []
            if row.duration:
                bits.append(f"{clock(row.duration)}")
            if row.frames:
                bits.append(f"{row.frames} frames")
            if row.video_id:
                bits.append(f"id {row.video_id[:12]}")
            if row.model_id:
                bits.append(row.model_id.split(" (")[0])
            st.caption(" · ".join(bits) or row.source)
            if row.status in ("ingesting", "queued"):
                frac = row.fraction
                label = f"ingesting: {row.frames} frames" + (f" ({frac:.0%})" if frac is not None else "")
                st.progress(frac if frac is not None else 0.0, text=label)
            if row.error:
                st.error(f"{row.name}: {row.error}")


def _md(text: str) -> str:
    """Text shown in markdown as it is (file names may hold *, _, [ …)."""
    return "".join("\\" + c if c in "\\`*_{}[]<>|~:$" else c for c in text)


def ingesting(lib: Library) -> bool:
    return any(job.active for job in lib.jobs())


def library_rows(lib: Library) -> list[VideoRow]:
    """The library by name: a row keeps its place when its ingest ends (the service lists running ingests first)."""
    return sorted(lib.videos(), key=lambda row: row.name.casefold())


def _listing(rows: list[VideoRow]) -> tuple:
    return tuple((r.video_id, r.job_id, r.name, r.status, r.frames, r.duration, r.error, r.model_id) for r in rows)


def _row_keys(lib: Library, rows: list[VideoRow]) -> list[str]:
    """A key per row that stays the same when an ingest's row (keyed by its job) becomes the stored video's row
    (no job on it, so found through the jobs' video ids; the newest job of a video wins)."""
    job_of = {job.video_id: job.job_id for job in lib.jobs() if job.video_id}
    keys, used = [], set()
    for i, row in enumerate(rows):
        key = row.job_id or job_of.get(row.video_id) or row.video_id or f"x{i}"
        if key in used:  # never two rows with one key (Streamlit refuses a duplicate key)
            key = f"{row.video_id or row.job_id}-{i}"
        used.add(key)
        keys.append(key)
    return keys


def library_list(lib: Library, polling: bool) -> None:
    """The list, in a fragment: its buttons rerun only it. Registered with `run_every` only while an ingest runs
    (`polling`): progress bars move and the rest of the page stays as it is. With no ingest running it does not
    rerun on its own, so nothing is redrawn under a pointer about to click."""
    state = tab_state()
    if (state.page == "video" and state.video_id) or state.flash:
        st.rerun(scope="app")  # an Open or Delete callback (run before this) changed the page or left a message
    if polling and not ingesting(lib):
        st.rerun(scope="app")  # the last ingest ended: the whole page once more, with the list still
    rows = library_rows(lib)
    state.listed = _listing(rows)
    if not rows:
        st.info("The library is empty: upload a video or add one by path. `make run` adds the sample video.")
    for row, key in zip(rows, _row_keys(lib, rows), strict=True):
        video_row(lib, row, key)


@st.fragment(run_every=POLL_S)
def library_watch(lib: Library) -> None:
    """While no ingest runs: draws nothing, and asks for the page again when the library changed since the list
    was drawn (an upload arrived through the upload route, a CLI ingest or another tab's delete)."""
    if ingesting(lib) or _listing(library_rows(lib)) != tab_state().listed:
        st.rerun(scope="app")


def library_page(lib: Library) -> None:
    st.title("vidmini")
    st.caption(f"Long-video questions, search and summaries · data in `{lib.root}`")
    a, b = st.columns(2)
    with a:
        upload_widget(lib)
    with b:
        add_by_path(lib)
    st.subheader("Library")
    polling = ingesting(lib)
    st.fragment(library_list, run_every=POLL_S if polling else None)(lib, polling)
    if not polling:
        library_watch(lib)


# ---- the video page -------------------------------------------------------------------------------------------
def media_url(lib: Library, video_id: str) -> str | None:
    """The player's source: the app's range-serving media route, as an absolute URL of this browser's origin."""
    url = getattr(st.context, "url", None)
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{MEDIA_PATH}/{video_id}?token={lib.upload_token}"


def player(lib: Library, row: VideoRow, state: TabState) -> None:
    t = state.seek.get(row.video_id, 0.0)
    url = media_url(lib, row.video_id)
    path = lib.media_path(row.video_id)
    if path is None:
        st.warning("The source file of this video is not on the server any more (or it was a stream): "
                   "questions and search still work from the stored frames.")
        return
    # no browser URL (a test harness): hand Streamlit the path
    st.video(url or str(path), start_time=int(t), format="video/mp4")
    if state.seek_nonce:  # also seek when the same time is clicked again (start_time would not change)
        st.html(f"""<script>/* seek {state.seek_nonce} */
(function(){{const v=document.querySelector('[data-testid="stVideo"]'); if(v){{v.currentTime={t:.3f};}}}})();
</script>""", unsafe_allow_javascript=True)


def timeline(lib: Library, row: VideoRow, state: TabState) -> None:
    """Thumbnails spread over the video, with the current search's moments and the player position marked."""
    thumbs = lib.thumbnails(row.video_id, TIMELINE_THUMBS)
    if not thumbs:
        st.caption("no thumbnails stored for this video")
        return
    duration = max(row.duration or 0.0, thumbs[-1][0], 1e-6)
    cells = "".join(
        f'<div class="vm-thumb" data-t="{t:.2f}" style="flex:1;min-width:0;text-align:center">'
        f'<img src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}" style="width:100%;display:block"/>'
        f'<span style="font-size:0.7em">{clock(t)}</span></div>' for t, jpeg in thumbs)
    marks = ""
    result = state.searches.get(row.video_id)
    if result is not None:
        for m in result.moments:
            left = 100 * m.start / duration
            width = max(100 * (m.end - m.start) / duration, 0.8)
            source = getattr(m, "source", "seen")
            fill, border = MOMENT_COLOUR.get(source, MOMENT_COLOUR["seen"])
            said = f" · heard “{m.text}”" if getattr(m, "text", None) else ""
            marks += (f'<div class="vm-moment" data-start="{m.start:.2f}" data-end="{m.end:.2f}" '
                      f'data-source="{source}" '
                      f'title="{html.escape(result.query)}: {span(m.start, m.end)} ({m.score:.2f}, {source})'
                      f'{html.escape(said)}" '
                      f'style="position:absolute;top:0;height:100%;left:{left:.2f}%;width:{width:.2f}%;'
                      f'background:{fill};border:2px solid {border};box-sizing:border-box"></div>')
    pos = 100 * state.seek.get(row.video_id, 0.0) / duration
    marks += (f'<div class="vm-position" style="position:absolute;top:0;height:100%;left:{pos:.2f}%;'
              'width:2px;background:#e00"></div>')
    st.html(f'<div class="vm-timeline" style="position:relative;display:flex;gap:2px">{cells}{marks}</div>')


def transcript_pane(lib: Library, row: VideoRow) -> None:
    """The transcript beside the player: the line being said follows playback (highlighted, scrolled into view),
    and a click on a line seeks the player to it. Both happen in the browser, without a rerun."""
    try:
        segments = lib.transcript(row.video_id)
    except LibraryError as e:
        st.caption(str(e))
        return
    st.markdown("**Transcript**")
    if not segments:
        st.caption(TRANSCRIPT_NOTE.get(row.transcript, "no speech heard"))
        return
    lines = "".join(
        f'<div class="vm-line" data-start="{seg.start:.3f}" data-end="{seg.end:.3f}" title="seek to {clock(seg.start)}"'
        f' style="cursor:pointer;padding:2px 4px;border-radius:4px">'
        f'<span style="color:#888;font-size:0.8em;margin-right:0.4em">{clock(seg.start)}</span>'
        f'{html.escape(seg.text)}</div>' for seg in segments)
    if row.transcript == "running":
        lines += f'<div style="color:#888;font-size:0.8em">{TRANSCRIPT_NOTE["running"]}</div>'
    st.html(f"""<div class="vm-transcript" style="max-height:340px;overflow-y:auto;font-size:0.9em">{lines}</div>
<script>(function(){{
  const pane = Array.from(document.querySelectorAll('.vm-transcript')).pop();
  if (!pane || pane.vmBound) return;
  pane.vmBound = true;
  const lines = Array.from(pane.querySelectorAll('.vm-line'));
  const player = () => document.querySelector('[data-testid="stVideo"]');
  function follow() {{
    const video = player();
    if (!video || !document.contains(pane)) return;
    const t = video.currentTime;
    let now = null;
    for (const line of lines) {{ if (parseFloat(line.dataset.start) <= t + 0.05) now = line; }}
    if (now && t > parseFloat(now.dataset.end) + 2.0) now = null;
    for (const line of lines) {{
      const on = line === now;
      line.classList.toggle('vm-now', on);
      line.style.background = on ? 'rgba(30,144,255,0.18)' : '';
    }}
    if (now) {{
      const top = now.offsetTop - pane.offsetTop;
      if (top < pane.scrollTop || top > pane.scrollTop + pane.clientHeight - now.offsetHeight)
        pane.scrollTop = Math.max(0, top - pane.clientHeight / 3);
    }}
  }}
  pane.addEventListener('click', (event) => {{
    const line = event.target.closest('.vm-line');
    const video = player();
    if (line && video) {{ video.currentTime = parseFloat(line.dataset.start); follow(); }}
  }});
  window.vmFollowTranscript = follow;
  function bind() {{  // the player may be drawn after this pane
    const video = player();
    if (!video) return false;
    if (!video.vmFollowing) {{
      for (const kind of ['timeupdate', 'seeked'])
        video.addEventListener(kind, () => window.vmFollowTranscript && window.vmFollowTranscript());
      video.vmFollowing = true;
    }}
    follow();
    return true;
  }}
  if (!bind()) {{
    const timer = setInterval(() => {{ if (bind() || !document.contains(pane)) clearInterval(timer); }}, 200);
  }}
}})();</script>""", unsafe_allow_javascript=True)


def answer_details(row: VideoRow, msg: dict, key: str) -> None:
    """Under an answer: its time range and the frames it used, every timestamp a seek link."""
    r = msg.get("range")
    times = msg.get("timestamps", [])
    if not times:
        return
    where = f"{span(r['start'], r['end'])} ({r['source']})" if r else f"whole video ({span(times[0], times[-1])})"
    st.caption(f"range {where} · {len(times)} frames · fused {msg['fused']} ({msg['policy']}) · "
               f"first token {msg['ttft_ms']:.0f} ms")
    picks = sorted({times[0], times[-1], *[times[int(j)] for j in
                    _spread(len(times), FRAMES_SHOWN)]})
    links = [(t, None) for t in picks]
    links += [(t, f"▶ {clock(t)} (in answer)") for t in msg.get("text_times", [])]
    links += [(m["start"], f"▶ {span(m['start'], m['end'])} (moment)") for m in msg.get("moments", [])]
    for h in msg.get("heard", []):  # a question about the speech: the transcript lines that answer it
        timestamp_button(row.video_id, h["start"], f"{key}-heard-{h['start']:.2f}", f"▶ {clock(h['start'])} heard: "
                         f"“{h['text']}”")
    if msg.get("speech"):
        st.caption(f"the prompt carried {len(msg['speech'])} line(s) of heard speech")
    cols = st.columns(min(len(links), 8) or 1)
    for j, (t, label) in enumerate(links):
        with cols[j % len(cols)]:
            timestamp_button(row.video_id, t, f"{key}-ts-{j}", label)


def _spread(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def chat_tab(lib: Library, row: VideoRow, state: TabState) -> None:
    duration = float(row.duration or 0.0)
    limit = st.toggle("Ask about a time range only", key=f"limit-{row.video_id}")
    start = end = None
    if limit and duration > 0:
        lo, hi = st.slider("Time range (seconds)", 0.0, max(duration, 1.0), (0.0, max(duration, 1.0)), step=1.0,
                           key=f"range-{row.video_id}", format="%d s")
        st.caption(f"questions use only {span(lo, hi)}")
        start, end = lo, hi
    history = state.chats.setdefault(row.video_id, [])
    for i, msg in enumerate(history):
        with st.chat_message(msg["role"]):
            if msg["role"] == "assistant" and msg.get("error"):
                st.error(msg["text"])
            else:
                st.markdown(msg["text"] or "_(empty answer)_")
            if msg["role"] == "assistant" and not msg.get("error"):
                answer_details(row, msg, f"chat-{row.video_id[:8]}-{i}")
    question = st.chat_input("Ask about this video", key=f"ask-{row.video_id}")
    if question:
        history.append({"role": "user", "text": question})
        with st.chat_message("user"):
            st.markdown(question)
        with st.chat_message("assistant"):
            msg = ask(lib, row, question, start, end)
            history.append(msg)
            if msg.get("error"):
                st.error(msg["text"])
            else:
                answer_details(row, msg, f"chat-{row.video_id[:8]}-{len(history) - 1}")


def ask(lib: Library, row: VideoRow, question: str, start: float | None, end: float | None) -> dict:
    """Ask with the answer streamed into the page; returns the chat record (or an error record)."""
    try:
        asking = lib.ask(row.video_id, question, AskOptions(start=start, end=end))
        st.write_stream(asking.text())
        got = asking.result()
    except LibraryError as e:
        return {"role": "assistant", "text": str(e), "error": True}
    except (RuntimeError, ValueError, OSError) as e:
        return {"role": "assistant", "text": f"the question failed: {type(e).__name__}: {e}", "error": True}
    a = got.answer
    return {"role": "assistant", "text": a.text, "range": None if a.range is None else
            {"start": a.range.start, "end": a.range.end, "source": a.range.source},
            "timestamps": a.timestamps, "fused": len(a.fused_frames), "policy": a.policy, "ttft_ms": a.ttft_ms,
            "text_times": times_in_question(a.text),
            "moments": [{"start": m.start, "end": m.end, "score": m.score} for m in got.moments],
            "heard": list(got.heard), "speech": [line.to_json() for line in a.speech]}


def search_tab(lib: Library, row: VideoRow, state: TabState) -> None:
    with st.form(f"search-{row.video_id}", border=False):
        query = st.text_input("Search this video", placeholder="a red circle · the word CAT · a blue background")
        submitted = st.form_submit_button("Search")
    if submitted:
        try:
            state.searches[row.video_id] = lib.search(query, row.video_id, k=SEARCH_K)
            st.rerun()  # the timeline above shows the new moments
        except LibraryError as e:
            st.error(str(e))
    result = state.searches.get(row.video_id)
    if result is None:
        return
    st.markdown(f"**{len(result.moments)} moment(s)** for “{html.escape(result.query)}”")
    for j, m in enumerate(result.moments):
        c1, c2 = st.columns([1, 4], vertical_alignment="center")
        with c1:
            if m.thumbnail:
                st.image(m.thumbnail, width=120)
        with c2:
            source = getattr(m, "source", "seen")
            timestamp_button(row.video_id, m.start, f"moment-{row.video_id[:8]}-{j}",
                             f"▶ {span(m.start, m.end)} · {source} · score {m.score:.3f}")
            if getattr(m, "text", None):
                st.caption(f"heard: “{m.text}”")
    if result.times is not None and len(result.times):
        import pandas as pd

        st.caption("relevance over time")
        st.line_chart(pd.DataFrame({"time (s)": result.times, "relevance": result.scores}),
                      x="time (s)", y="relevance", height=180)


def summary_tab(lib: Library, row: VideoRow) -> None:
    text = lib.summary(row.video_id)
    if not text:
        st.info("no summary yet; run `vidmini summarize`")
        return
    st.markdown(text)
    for j, c in enumerate(lib.summary_chapters(row.video_id)):
        left, right = st.columns([1, 5], vertical_alignment="top")
        with left:
            timestamp_button(row.video_id, c["start"], f"chapter-{row.video_id[:8]}-{j}",
                             f"▶ {span(c['start'], c['end'])}")
        with right:
            st.markdown(f"**{_md(c['title'])}** {_md(c['summary'])}")


def video_page(lib: Library, state: TabState) -> None:
    st.button("← Library", on_click=_back)
    try:
        row = lib.video(state.video_id)
    except LibraryError as e:
        st.error(str(e))
        return
    st.header(_md(row.name))
    st.caption(f"{clock(row.duration or 0)} · {row.frames} frames · id {row.video_id}")
    if row.transcript in ("none", "no_audio"):  # nothing to show beside the player
        player(lib, row, state)
        if row.transcript == "no_audio":
            st.caption(TRANSCRIPT_NOTE["no_audio"])
    else:
        left, right = st.columns([3, 2], vertical_alignment="top")
        with left:
            player(lib, row, state)
        with right:
            transcript_pane(lib, row)
    timeline(lib, row, state)
    chat, search, summary = st.tabs(["Chat", "Search", "Summary"])
    with chat:
        chat_tab(lib, row, state)
    with search:
        search_tab(lib, row, state)
    with summary:
        summary_tab(lib, row)


@st.cache_resource(show_spinner=False)
def access_keys(path: str) -> ApiKeys:
    return ApiKeys.from_file(path)


def logged_in() -> bool:
    """With `$VIDMINI_API_KEY_FILE` set (`vidmini serve --app --api-key-file`), a tab shows nothing until it has
    given one of those keys; the key itself is not kept, only that this tab gave one."""
    path = os.environ.get(KEY_FILE_ENV)
    if not path or st.session_state.get("vidmini_login"):
        return True
    keys = access_keys(path)
    st.title("vidmini")
    with st.form("login"):
        key = st.text_input("API key", type="password", help="one of the keys this server was started with")
        if st.form_submit_button("Log in"):
            if keys.allows(key.strip()):
                st.session_state["vidmini_login"] = True
                st.rerun()
            st.error("That key is not one of this server's keys.")
    return False


def main() -> None:
    st.set_page_config(page_title="vidmini", page_icon="🎞️", layout="wide")
    if not logged_in():
        return
    lib = get_library(str(data_home()))
    state = tab_state()
    problem = watches.start_watches(lib)  # once per process: the data home's watches run beside the app
    if problem:
        state.flash.append(("error", problem))
    for kind, text in state.flash:
        getattr(st, kind)(text)
    state.flash.clear()
    with st.sidebar:
        nav(state)
        model_panel(lib)
    if state.page == "video" and state.video_id:
        video_page(lib, state)
    elif state.page == "watches":
        watches.watches_page(lib)
    else:
        library_page(lib)

