"""`vidmini watch`: live watches of cameras and streams (add, list, rm, pause, resume, run, alerts).

add/rm/pause/resume change the watch's folder under the data home; a running `vidmini serve` or `vidmini watch
run` picks the change up within seconds (it reconciles with the folders), so these need no server connection.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def add_parser(sub) -> None:
    p = sub.add_parser("watch", help="watch cameras and streams around the clock: rules, alerts (webhooks, MQTT)")
    wsub = p.add_subparsers(dest="watch_command", required=True, metavar="{add,list,rm,pause,resume,run,ask,report,alerts}")

    add = wsub.add_parser("add", help="watch a stream URL (RTSP, HTTP(S)/HLS, SRT, UDP, TCP) or a growing file")
    add.add_argument("source")
    add.add_argument("--name", required=True, help="the watch's name (letters, digits, - and _)")
    add.add_argument("--fps", type=float, default=1.0, help="frames judged per second (default 1)")
    add.add_argument("--retain", default=None, metavar="DURATION",
                     help="keep this much of the recording, e.g. 24h, 90m, 2d (default 24h unless --retain-gb)")
    add.add_argument("--retain-gb", type=float, default=None, metavar="G", help="keep at most G GB of recording")
    add.add_argument("--rule", dest="rules", action="append", default=[], metavar="EVENT",
                     help='an event to alert on, e.g. "a person enters" (repeat for several)')
    add.add_argument("--on-frames", type=int, default=2, help="positive frames in a row that start an event")
    add.add_argument("--off-frames", type=int, default=3, help="negative frames in a row that end it")
    add.add_argument("--cooldown", default="0s", metavar="DURATION", help="after an event ends, none before this")
    add.add_argument("--segment", default="60s", metavar="DURATION", help="length of the recorded segments")
    add.add_argument("--webhook", action="append", default=[], metavar="URL",
                     help="POST every alert here as JSON (signed: X-Vidmini-Signature)")
    add.add_argument("--webhook-secret", default=None, help="the HMAC secret for --webhook (required with it)")
    add.add_argument("--mqtt", action="append", default=[], metavar="HOST[:PORT]",
                     help="publish alerts to vidmini/<watch>/events on this MQTT broker")
    add.add_argument("--paused", action="store_true", help="add it paused")

    ls = wsub.add_parser("list", help="the watches and what each is doing")
    ls.add_argument("--json", action="store_true")
    for name, text in (("rm", "remove a watch and everything it recorded"), ("pause", "stop watching for now"),
                       ("resume", "watch again")):
        c = wsub.add_parser(name, help=text)
        c.add_argument("name")
    run = wsub.add_parser("run", help="run the watches here in the foreground (what `vidmini serve` also does)")
    run.add_argument("--model", help="checkpoint directory or Hugging Face id")
    run.add_argument("--device", default="cpu")
    ask = wsub.add_parser("ask", help="a question over a watch's recording in wall-clock time")
    ask.add_argument("name")
    ask.add_argument("question")
    ask.add_argument("--since", default=None, help="from: a time (ISO 8601; no zone = local) or a duration back, "
                                                   "e.g. 10m (default: the oldest frame kept)")
    ask.add_argument("--until", default=None, help="to: a time or a duration back (default: now)")
    ask.add_argument("--json", action="store_true")
    ask.add_argument("--model", help="checkpoint directory or Hugging Face id")
    rep = wsub.add_parser("report", help='"while you were away": each watch summarized over a span, and its alerts')
    rep.add_argument("names", nargs="*", metavar="NAME", help="the watches (default: all)")
    rep.add_argument("--since", default="8h", help="from (a time, or a duration back; default 8h)")
    rep.add_argument("--until", default=None, help="to (default: now)")
    rep.add_argument("--window", type=float, default=60.0, help="seconds per summary line (default 60)")
    rep.add_argument("--json", action="store_true")
    rep.add_argument("--model", help="checkpoint directory or Hugging Face id")
    al = wsub.add_parser("alerts", help="a watch's alerts, newest last")
    al.add_argument("name")
    al.add_argument("--json", action="store_true")


def _folders():
    from vidmini.common.paths import data_home
    from vidmini.service.watches import WatchFolders

    return WatchFolders(data_home())


def _spec(args: argparse.Namespace):
    from vidmini.service.watches import DEFAULT_RETAIN_S, RuleSpec, WatchError, WatchSpec, parse_duration

    retain_s = parse_duration(args.retain) if args.retain else (None if args.retain_gb else DEFAULT_RETAIN_S)
    retain_bytes = int(args.retain_gb * 1e9) if args.retain_gb else None
    cooldown = 0.0 if args.cooldown in ("0", "0s") else parse_duration(args.cooldown)
    try:
        rules = tuple(RuleSpec(e, on_frames=args.on_frames, off_frames=args.off_frames, cooldown_s=cooldown).to_dict()
                      for e in args.rules)
    except ValueError as e:
        raise WatchError(str(e)) from None
    if args.webhook and not args.webhook_secret:
        raise WatchError("--webhook needs --webhook-secret (the receiver checks the signature with it)")
    sinks = [{"type": "webhook", "url": u, "secret": args.webhook_secret} for u in args.webhook]
    for broker in args.mqtt:
        host, _, port = broker.rpartition(":") if ":" in broker else (broker, "", "1883")
        if not port.isdigit():
            raise WatchError(f"--mqtt takes HOST[:PORT], not {broker!r}")
        sinks.append({"type": "mqtt", "host": host, "port": int(port)})
    return WatchSpec(args.name, args.source, fps=args.fps, retain_s=retain_s, retain_bytes=retain_bytes,
                     rules=rules, sinks=tuple(sinks), segment_s=parse_duration(args.segment), paused=args.paused)


def cmd_watch(args: argparse.Namespace) -> int:
    from vidmini.common.errors import UsageError
    from vidmini.service.watches import WatchError

    try:
        return _COMMANDS[args.watch_command](args)
    except WatchError as e:
        raise UsageError(str(e)) from None


def _add(args: argparse.Namespace) -> int:
    spec = _folders().add(_spec(args))
    rules = ", ".join(r["event"] for r in spec.rules) or "no rules (recording only)"
    print(f"watch {spec.name}: {spec.source} at {spec.fps:g} fps, {rules}"
          + (" (paused)" if spec.paused else "; a running `vidmini serve` or `vidmini watch run` starts it"))
    return 0


def _list(args: argparse.Namespace) -> int:
    folders = _folders()
    rows = []
    for spec in folders.all():
        state = folders.read_state(spec.name)
        rows.append({"name": spec.name, "source": spec.source, "paused": spec.paused, "fps": spec.fps,
                     "rules": [r["event"] for r in spec.rules], "retain_s": spec.retain_s,
                     "retain_bytes": spec.retain_bytes, "frames": state.get("frames", 0),
                     "alerts": state.get("alerts", 0), "last_frame": state.get("last_frame")})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no watches (add one: vidmini watch add URL --name NAME --rule EVENT)")
    for r in rows:
        print(f"{r['name']}  {'paused' if r['paused'] else 'active'}  {r['source']}  {r['frames']} frames, "
              f"{r['alerts']} alerts, last frame {r['last_frame'] or '-'}  rules: {'; '.join(r['rules']) or '-'}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    _folders().remove(args.name)
    print(f"removed watch {args.name}")
    return 0


def _pause(args: argparse.Namespace) -> int:
    _folders().set_paused(args.name, True)
    print(f"paused watch {args.name}")
    return 0


def _resume(args: argparse.Namespace) -> int:
    _folders().set_paused(args.name, False)
    print(f"resumed watch {args.name}")
    return 0


def _alerts(args: argparse.Namespace) -> int:
    from vidmini.service.watches import watch_alerts

    alerts = watch_alerts(_folders(), args.name)
    if args.json:
        print(json.dumps([a.to_dict(thumbnail=False) for a in alerts], indent=1))
        return 0
    for a in alerts:
        print(f"{a.start}  {a.kind:6}  {a.rule}" + (f"  until {a.end}" if a.end else "")
              + f"  ({a.confidence:.2f})" + (f"  clip {a.clip_path}" if a.clip_path else ""))
    return 0


def _run(args: argparse.Namespace) -> int:
    from vidmini.common.paths import data_home
    from vidmini.service.library import Library
    from vidmini.service.watches import run_watches

    lib = Library(data_home(), model=args.model, device=args.device)
    manager = run_watches(lib)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    seq = 0
    print(f"watching {len(manager.folders.names())} watch(es); Ctrl-C to stop", file=sys.stderr)

    def print_new() -> None:
        nonlocal seq
        for number, alert in manager.feed.since(seq):
            seq = number
            print(f"{alert.watch}  {alert.kind:6}  {alert.rule}  {alert.start}"
                  + (f" → {alert.end}" if alert.end else ""), flush=True)

    try:
        while not done.is_set():
            manager.feed.wait(seq, 0.5)
            print_new()
    except KeyboardInterrupt:
        pass
    finally:
        manager.close()  # the runners stop; what they made meanwhile is printed too, so nothing made goes unsaid
        print_new()
        lib.close()
    return 0


def _local(iso: str | None) -> str:
    """An ISO time shown in this machine's time zone (with its offset)."""
    from datetime import datetime

    return datetime.fromisoformat(iso).astimezone().isoformat(timespec="seconds") if iso else "-"


def _ask(args: argparse.Namespace) -> int:
    from vidmini.common.paths import data_home
    from vidmini.service.library import Library
    from vidmini.service.watches import ask_watch

    lib = Library(data_home(), model=args.model)
    asking = ask_watch(lib, args.name, args.question, since=args.since, until=args.until)
    if not args.json:
        for piece in asking.text():
            print(piece, end="", flush=True)
        print()
    answer = asking.result()
    if args.json:
        print(json.dumps(answer.to_json(), indent=1))
    else:
        print(f"({args.name}, {_local(answer.since)} to {_local(answer.until)}, {answer.frames} frames)",
              file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from vidmini.common.paths import data_home
    from vidmini.service.library import Library
    from vidmini.service.watches import watch_report

    lib = Library(data_home(), model=args.model)
    report = watch_report(lib, args.names or None, since=args.since, until=args.until, window_s=args.window)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"# While you were away: {_local(report['since'])} to {_local(report['until']) if report['until'] else 'now'}")
    for w in report["watches"]:
        print(f"\n## {w['name']}: {w['frames']} frames, {len(w['alerts'])} alerts\n\n{w['summary']}\n")
        for line in w["windows"]:
            print(f"- {_local(line['start'])} – {_local(line['end'])[11:]}: {line['text']}")
    print("\n## Alerts in order\n")
    for a in report["alerts"]:
        print(f"- {_local(a['start'])}  {a['watch']}  {a['kind']}  {a['rule']}"
              + (f" (until {_local(a['end'])[11:]})" if a.get("end") else ""))
    if not report["alerts"]:
        print("- none")
    return 0


_COMMANDS = {"add": _add, "list": _list, "rm": _rm, "pause": _pause, "resume": _resume, "run": _run,
             "alerts": _alerts, "ask": _ask, "report": _report}
