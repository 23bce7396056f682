"""The daemon on a veth link between two network namespaces, with concurrent real calls.

The test builds its own little network: namespaces ``A`` (callers) and ``B`` (callees and
the recorder) joined by a veth pair with addresses of a private /24 that exist only inside
them.  ``callcap daemon --interface <B's veth end>`` runs in ``B`` while sipp calls from
``A`` to ``B``, four at once: two answered calls with speech (one with RFC 2833 DTMF, one in
A-law), one cancelled while ringing and one rejected with 486.  Then SIGTERM.

Checked: READY=1 came before the first call; each answered call has a WAV whose channels
correlate >= 0.99 with what each side sent and a sidecar that validates, with the right
addresses and DTMF digits; the failed calls left no WAV; every log line is a JSON object and
the lifecycle events are all there.  The namespaces are removed whatever happens.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import soundfile
from daemon_harness import LIFECYCLE_EVENTS, RunningDaemon, write_config
from netns_harness import NetnsPair
from sipp_harness import CallRun, best_lag, run_call

from callcap.storage.sidecar import validate_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_concurrent_calls_across_a_veth_link_are_recorded(
    tmp_path: Path, netns_pair: NetnsPair
) -> None:
    net = netns_pair
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "callcap.yaml",
        "calls:\n  failed_linger_s: 0.5\nlogging:\n  stats_interval_s: 2\n",
    )
    daemon = RunningDaemon(
        tmp_path,
        ["--config", str(config), "--interface", net.veth_b, "--out", str(out)],
        netns=net.b,
    )
    peers = {
        "uac_ip": net.ip_a,
        "uas_ip": net.ip_b,
        "uac_netns": net.a,
        "uas_netns": net.b,
        "capture_on": None,
    }
    plans: dict[str, dict[str, object]] = {
        "dtmf": {"codec": "PCMU", "dtmf": ((0.8, "4"), (1.6, "2"))},
        "alaw": {
            "codec": "PCMA",
            "caller_text": "A second caller reads numbers: seven, eight, nine.",
            "callee_text": "The second callee answers, slowly and clearly.",
        },
        "cancel": {"cancel": True},
        "busy": {"reject": 486},
    }
    runs: dict[str, CallRun] = {}
    try:
        ready_at = daemon.wait_ready()
        threads = [
            threading.Thread(
                target=lambda n=name, kw=kwargs: runs.__setitem__(
                    n,
                    run_call(tmp_path / n, timeout=30, **peers, **kw),  # type: ignore[arg-type]
                )
            )
            for name, kwargs in plans.items()
        ]
        first_call_at = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        daemon.wait_event("call_ended", where=lambda e: e["end_reason"] == "cancel")
        daemon.wait_event("call_ended", where=lambda e: e["end_reason"] == "rejected_486")
        deadline = time.monotonic() + 20
        while len(list(out.rglob("*.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert daemon.stop() == 0, daemon.stderr[-2000:]
    finally:
        daemon.close()

    assert ready_at < first_call_at
    for name, run in runs.items():
        assert run.returncodes == {"uac": 0, "uas": 0}, (name, run.uac_log[-2000:])
    assert set(runs) == set(plans)

    events = [json.loads(line) for line in daemon.lines]  # every line is one JSON object
    assert all({"ts", "level", "event"} <= e.keys() for e in events)
    names = [e["event"] for e in events]
    for expected in (*LIFECYCLE_EVENTS, "capture_stats"):
        assert expected in names, expected
    (capture,) = [e for e in events if e["event"] == "capture_started"]
    assert capture["interfaces"] == [net.veth_b]
    assert names.index("capture_started") < names.index("call_started")
    assert names.count("call_started") == 4
    ended = sorted(e["end_reason"] for e in events if e["event"] == "call_ended")
    assert ended == ["bye_caller", "bye_caller", "cancel", "rejected_486"]
    stats = [e for e in events if e["event"] == "capture_stats"][-1]
    assert stats["kernel_received_total"] >= stats["packets_total"] > 500
    assert stats["kernel_dropped_total"] == 0

    written = {e["call_uid"]: e for e in events if e["event"] == "recording_written"}
    assert len(written) == 2
    assert len(list(out.rglob("*.wav"))) == 2  # the cancelled and the rejected call: none
    by_codec: dict[str, tuple[dict[str, object], Path]] = {}
    for event in written.values():
        sidecar = Path(event["sidecar"])
        doc = json.loads(sidecar.read_text(encoding="utf-8"))
        validate_sidecar(doc)
        assert (doc["caller_ip"], doc["callee_ip"]) == (net.ip_a, net.ip_b)
        by_codec[doc["streams"][0]["codec"]] = (doc, Path(event["path"]))
    assert set(by_codec) == {"PCMU", "PCMA"}
    for codec, name in (("PCMU", "dtmf"), ("PCMA", "alaw")):
        doc, wav = by_codec[codec]
        run = runs[name]
        assert doc["end_reason"] == "bye_caller"
        audio, rate = soundfile.read(str(wav), dtype="int16")
        assert rate == 8000
        assert run.caller is not None and run.callee is not None
        for ch, side in enumerate((run.caller, run.callee)):
            corr, _lag = best_lag(side.reference, audio[:, ch])
            assert corr >= 0.99, (name, ch, corr)
    dtmf_doc = by_codec["PCMU"][0]
    assert [(d["digit"], d["side"], d["source"]) for d in dtmf_doc["dtmf"]] == [  # type: ignore[union-attr, index]
        ("4", "caller", "rfc4733"),
        ("2", "caller", "rfc4733"),
    ]
    assert by_codec["PCMA"][0]["dtmf"] == []
