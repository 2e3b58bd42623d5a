"""The engine with modern ZFS and without it, on hosts that replay recorded zfs output.

Both probes were recorded (zfs-fuse on the lab, OpenZFS 2.1.11 in the lab guest); the
other OpenZFS answers (``send -nvP``, resume token contents, error messages) follow its
command line. The stream
itself is replaced: what is checked is which commands run, in which order, with which
options, and what the pair's status and checks then say.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.tokens import encode
from zettabee import checks, fastpath, tree
from zettabee.errors import CommandError, StateError, TransportError, ZettabeeError
from zettabee.health import SYNCHRONIZED, Health
from zettabee.host import Result, error_for
from zettabee.hosts import Hosts
from zettabee.pair import Endpoint, Pair, PairOptions, hold_tag, replica_id
from zettabee.relay import StreamResult
from zettabee.replicator import Replicator
from zettabee.run import PairRun, progress_writer
from zettabee.state import FAILED, IDLE, StateStore, Status

RECORDED = Path(__file__).parent / "recorded"
FUSE_PROBE = (RECORDED / "zfs-fuse-probe.txt").read_text()
OPENZFS_PROBE = (RECORDED / "openzfs-2.1-probe.txt").read_text()

SRC_FS, DST_FS = "tank/data", "backup/data"
TOKEN = "1-10b4b4e7f2-e8-789c636064000310a500c4ec50360710e72765a526973030"


def make_pair(**options: Any) -> Pair:
    return Pair(Endpoint("src", SRC_FS), Endpoint("dst", DST_FS), PairOptions(**options))


# Both recorded probes' pools answer with this guid here: the destination's replica id.
POOL_GUID = "2591689529063941839"
RID = replica_id(POOL_GUID)
OTHER_RID = replica_id("10396368085209583401")  # another backup server's pool


def named(fp: str, day: int, rid: str | None = RID) -> str:
    """The pair's snapshot of 2026-01-0``day``, as this replica names it (``rid`` None:
    as named before the replica id)."""
    return f"zettabee.{fp}.{rid + '.' if rid else ''}2026010{day}T000000Z"


PAIR = make_pair()
FP = PAIR.fingerprint
TAG = hold_tag(FP, RID)
OLD_TAG = hold_tag(FP, None)
S0, S1, S2 = (named(FP, i) for i in (1, 2, 3))


class ScriptedHost:
    """Answers commands by argv prefix; the last answer for a prefix repeats."""

    is_local = True

    def __init__(self, name: str, probe: str, pool: str, events: list[tuple[str, ...]]) -> None:
        self.name = name
        self.events = events
        self.answers: list[tuple[list[str], list[tuple[int, str, str]]]] = []
        self.on(["sh", "-c"], _probe_for(probe, pool))

    def on(self, prefix: list[str], stdout: str = "", stderr: str = "", rc: int = 0) -> None:
        for known, answers in self.answers:
            if known == prefix:
                answers.append((rc, stdout, stderr))
                return
        self.answers.append((prefix, [(rc, stdout, stderr)]))

    def now(self, prefix: list[str], stdout: str) -> None:
        """From now on, answer ``prefix`` so (what the host is after a change)."""
        self.answers = [(known, answers) for known, answers in self.answers if known != prefix]
        self.on(prefix, stdout)

    def run(self, argv: list[str], *, check: bool = True, **_: object) -> Result:
        argv = list(argv)
        self.events.append((self.name, *argv))
        rc, out, err = 0, "", ""
        for prefix, answers in sorted(self.answers, key=lambda a: -len(a[0])):
            if argv[: len(prefix)] == prefix:
                rc, out, err = answers.pop(0) if len(answers) > 1 else answers[0]
                break
        if check and rc:
            raise error_for(argv, self.name, rc, err)
        return Result(argv, self.name, rc, out, err)

    def calls(self, *prefix: str) -> list[list[str]]:
        return [
            list(e[1:]) for e in self.events if e[0] == self.name and e[1:][: len(prefix)] == prefix
        ]

    def start(self) -> None:
        pass

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass


def _probe_for(text: str, pool: str) -> str:
    for recorded in ("gsrc", "tdstpool"):
        text = text.replace(f"\n{recorded} ", f"\n{pool} ")
    return re.sub(rf"(?m)^({pool} +guid +)[0-9]+", rf"\g<1>{POOL_GUID}", text)


class FakeHosts(Hosts):
    def __init__(self, src: ScriptedHost, dst: ScriptedHost) -> None:
        super().__init__("/nonexistent/known_hosts")
        self.src, self.dst = src, dst

    def get(self, endpoint: Endpoint, pair: Pair) -> Any:
        return self.src if endpoint == pair.source else self.dst


def listing(
    fs: str,
    snaps: list[tuple[str, int, int]],
    *,
    token: str | None = None,
    owner: str | None = FP,
    lastsnap: str = "",
    marks: Sequence[tuple[str, int]] = (),
) -> str:
    """``zfs get -Hp -d 1`` output: (name, guid, userrefs) per snapshot, oldest first."""
    lines = [f"{fs}\tguid\t900", f"{fs}\tcreation\t1000", f"{fs}\tuserrefs\t-"]
    if owner is not None:
        lines.append(f"{fs}\tzettabee:fingerprint\t{owner}")
        lines.append(f"{fs}\tzettabee:lastsnap\t{lastsnap or (snaps[-1][0] if snaps else '-')}")
    lines.append(f"{fs}\treceive_resume_token\t{token or '-'}")
    for i, (name, guid, refs) in enumerate(snaps):
        lines += [f"{fs}@{name}\tguid\t{guid}", f"{fs}@{name}\tcreation\t{1000 + i}",
                  f"{fs}@{name}\tcreatetxg\t{10 + i}", f"{fs}@{name}\tuserrefs\t{refs}",
                  f"{fs}@{name}\treceive_resume_token\t-"]  # fmt: skip
    for name, guid in marks:
        lines += [f"{fs}#{name}\tguid\t{guid}", f"{fs}#{name}\tcreation\t1000",
                  f"{fs}#{name}\tcreatetxg\t5"]  # fmt: skip
    return "\n".join(lines) + "\n"


ESTIMATE = f"incremental\t{S1}\t{SRC_FS}@x\t52690464\nsize\t52690464\n"


def resume_contents(target: str) -> str:
    return (
        "resume token contents:\nnvlist version: 0\n"
        "\tfromguid = 0x1\n\tobject = 0x80\n\toffset = 0x1800000\n"
        f"\tbytes = 0x1819f88\n\ttoguid = 0x2\n\ttoname = {SRC_FS}@{target}\n"
        f"incremental\t{S1}\t{SRC_FS}@{target}\t27393408\nsize\t27393408\n"
    )


class Lab:
    """Two scripted hosts, a state directory, and a stream that records what it was asked."""

    def __init__(
        self, tmp: Path, src_probe: str = OPENZFS_PROBE, dst_probe: str = OPENZFS_PROBE
    ) -> None:
        self.events: list[tuple[str, ...]] = []
        self.src = ScriptedHost("src", src_probe, "tank", self.events)
        self.dst = ScriptedHost("dst", dst_probe, "backup", self.events)
        self.store = StateStore(tmp / "state", tmp / "run", tmp / "log")
        hosts = FakeHosts(self.src, self.dst)
        self.replicator = Replicator(self.store, hosts, streamer=self._stream)
        self.streams: list[tuple[list[str], list[str], int | None]] = []
        self.failures: list[Callable[[], None]] = []

    def _stream(self, run: PairRun, send: list[str], recv: list[str], total: int | None,
                first: Sequence[Sequence[str]]) -> StreamResult:  # fmt: skip
        self.events.append(("stream", *send, "|", *recv))
        self.streams.append((send, recv, total))
        if self.failures:
            self.failures.pop(0)()
        return StreamResult(1000, 1.0)

    def status(self, pair: Pair = PAIR) -> Status:
        return self.store.read_status(pair.fingerprint)

    def new_snapshot(self) -> str:
        [snap] = self.src.calls("zfs", "snapshot")
        return snap[-1].split("@", 1)[1]

    def index(self, *event: str) -> int:
        return self.events.index(event)


def test_update_on_openzfs_holds_the_base_receives_resumably_with_a_size(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)]))
    lab.src.on(["zfs", "send", "-nvP"], ESTIMATE)
    report = lab.replicator.update(PAIR)
    new = lab.new_snapshot()
    assert report.snapshot == new and report.base == S1
    # one probe per host, the listings ask for the token, hold counts and bookmarks
    assert len(lab.src.calls("sh", "-c")) == len(lab.dst.calls("sh", "-c")) == 1
    [dview] = lab.dst.calls("zfs", "get", "-Hp", "-d")
    assert "receive_resume_token" in dview[-3] and "userrefs" in dview[-3]
    [sview] = lab.src.calls("zfs", "get")
    assert "bookmark" in sview[sview.index("-t") + 1]
    [(send, recv, total)] = lab.streams
    assert send == ["zfs", "send", "-i", f"{SRC_FS}@{S1}", f"{SRC_FS}@{new}"]
    assert recv == ["zfs", "receive", "-s", DST_FS]
    assert total == 52690464
    # the new snapshot is held before it travels; the holds move forward after
    held = lab.index("src", "zfs", "hold", TAG, f"{SRC_FS}@{new}")
    assert held < lab.index("stream", *send, "|", *recv)
    assert lab.dst.calls("zfs", "hold") == [["zfs", "hold", TAG, f"{DST_FS}@{new}"]]
    assert lab.dst.calls("zfs", "release") == [["zfs", "release", TAG, f"{DST_FS}@{S1}"]]
    assert lab.src.calls("zfs", "release") == [["zfs", "release", TAG, f"{SRC_FS}@{S1}"]]
    assert lab.index("dst", "zfs", "hold", TAG, f"{DST_FS}@{new}") < lab.index(
        "dst", "zfs", "release", TAG, f"{DST_FS}@{S1}"
    )
    status = lab.status()
    assert status.extra["features"]["uses"] == [
        "holds (source and destination)", "resumable receive", "size estimates",
    ]  # fmt: skip
    assert "resume" not in status.extra


def test_update_on_zfs_fuse_uses_holds_and_nothing_it_lacks(tmp_path: Path) -> None:
    lab = Lab(tmp_path, FUSE_PROBE, FUSE_PROBE)
    fuse = listing(DST_FS, [(S1, 1, 0)]).replace(f"{DST_FS}\treceive_resume_token\t-\n", "")
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 0)], owner=None))
    lab.dst.on(["zfs", "get"], fuse)
    lab.replicator.update(PAIR)
    new = lab.new_snapshot()
    [dview] = lab.dst.calls("zfs", "get")
    assert "receive_resume_token" not in dview[-3]  # zfs-fuse would refuse the property
    [sview] = lab.src.calls("zfs", "get")
    assert "-t" not in sview  # nor zfs get -t
    [(send, recv, total)] = lab.streams
    assert recv == ["zfs", "receive", DST_FS] and total is None
    assert not lab.src.calls("zfs", "send")  # no -nvP estimate
    assert lab.src.calls("zfs", "hold") == [["zfs", "hold", TAG, f"{SRC_FS}@{new}"]]
    assert lab.status().extra["features"]["uses"] == ["holds (source and destination)"]


def test_an_interrupted_receive_resumes_then_the_update_goes_on(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1), (S2, 2, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)], token=TOKEN))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1), (S2, 2, 0)]))
    lab.src.on(["zfs", "send", "-nvP", "-t"], resume_contents(S2))
    lab.src.on(["zfs", "send", "-nvP", "-i"], ESTIMATE)
    report = lab.replicator.update(PAIR)
    new = lab.new_snapshot()
    assert report.resumed == S2
    assert report.bytes == 2000  # the resumed stream counts with the new one
    resumed, incremental = lab.streams
    assert resumed == (["zfs", "send", "-t", TOKEN], ["zfs", "receive", "-s", DST_FS], 27393408)
    assert incremental[0] == ["zfs", "send", "-i", f"{SRC_FS}@{S2}", f"{SRC_FS}@{new}"]
    # the resumed snapshot is recorded before the next stream starts
    recorded = lab.index("dst", "zfs", "set", f"zettabee:lastsnap={S2}", DST_FS)
    assert recorded < lab.index("stream", *incremental[0], "|", *incremental[1])
    assert not lab.dst.calls("zfs", "receive", "-A")
    assert sorted(c[-1] for c in lab.src.calls("zfs", "release")) == [
        f"{SRC_FS}@{S1}", f"{SRC_FS}@{S2}",
    ]  # fmt: skip
    assert "resume" not in lab.status().extra


def test_a_stale_token_is_cleared_and_the_pair_falls_back(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)], token=TOKEN))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)]))
    gone = f"cannot resume send: '{SRC_FS}@{S2}' used in the initial send no longer exists\n"
    lab.src.on(["zfs", "send", "-nvP", "-t"], "", gone, rc=255)
    lab.src.on(["zfs", "send", "-nvP", "-i"], ESTIMATE)
    report = lab.replicator.update(PAIR)
    assert lab.dst.calls("zfs", "receive", "-A") == [["zfs", "receive", "-A", DST_FS]]
    [(send, _, _)] = lab.streams  # only the normal incremental, from the old base
    assert send[:4] == ["zfs", "send", "-i", f"{SRC_FS}@{S1}"]
    assert report.resumed == "" and report.base == S1
    assert "resume" not in lab.status().extra


def test_a_token_refused_by_the_stream_itself_is_cleared_too(tmp_path: Path) -> None:
    """No estimate to check it first (or it passed), and send -t refuses mid-way."""
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1), (S2, 2, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)], token=TOKEN))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)]))
    lab.src.on(["zfs", "send", "-nvP", "-t"], resume_contents(S2))
    said = (
        f"cannot resume send: '{SRC_FS}@{S2}' is no longer the same snapshot used in the "
        "initial send"
    )

    def refuse() -> None:
        raise CommandError(["zfs", "send", "-t", TOKEN], "src", 255, said, "zfs send (over ssh)")

    lab.failures.append(refuse)
    lab.replicator.update(PAIR)
    assert lab.dst.calls("zfs", "receive", "-A") == [["zfs", "receive", "-A", DST_FS]]
    assert len(lab.streams) == 2 and lab.streams[1][0][2:4] == ["-i", f"{SRC_FS}@{S1}"]


def test_a_broken_resumable_stream_says_what_is_kept(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get", "-Hp", "-d"], listing(DST_FS, [(S1, 1, 1)]))
    lab.dst.on(["zfs", "get", "-Hp", "-o"], f"{DST_FS}\treceive_resume_token\t{TOKEN}\n")
    lab.src.on(["zfs", "send", "-nvP"], ESTIMATE)

    def cut() -> None:
        progress_writer(lab.store, PAIR)(5_000_000, 2.0)
        # the destination keeps the partial receive of the new snapshot: a resume token
        kept = encode({"toname": f"{SRC_FS}@{lab.new_snapshot()}", "toguid": 7})
        lab.dst.now(["zfs", "get", "-Hp", "-d"], listing(DST_FS, [(S1, 1, 1)], token=kept))
        raise TransportError("ssh to src failed (exit 255): Connection reset by peer")

    lab.failures.append(cut)
    with pytest.raises(TransportError) as caught:
        lab.replicator.update(PAIR)
    new = lab.new_snapshot()
    message = str(caught.value)
    assert "Connection reset" in message and "the receive is resumable" in message
    assert "4.8 MiB" in message and "next update resumes" in message
    assert not lab.src.calls("zfs", "destroy")
    status = lab.status()
    assert status.state == FAILED
    assert status.extra["resume"]["snapshot"] == new
    assert status.extra["resume"]["kept"] == 5_000_000
    # the new snapshot stays held on the source: the resume needs it
    assert not lab.src.calls("zfs", "release")
    health = Health(PAIR, SYNCHRONIZED, status=status, run_state=FAILED, runtime=3)
    outcome = checks.evaluate(checks.runtime_check([health]))
    assert outcome.code == 2 and "resumable" in outcome.output and new in outcome.output


MODIFIED = "cannot receive incremental stream: destination backup/data has been modified"


def refused_lab(tmp_path: Path, destroy: tuple[int, str] = (0, "")) -> Lab:
    """An update whose receive is refused (a modified replica), no resume token after it."""
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get", "-Hp", "-d"], listing(DST_FS, [(S1, 1, 1)]))
    lab.src.on(["zfs", "send", "-nvP"], ESTIMATE)
    lab.src.on(["zfs", "destroy"], stderr=destroy[1], rc=destroy[0])

    def refused() -> None:
        raise CommandError(["zfs", "receive"], "dst", 1, MODIFIED, "zfs receive")

    lab.failures.append(refused)
    return lab


def test_a_refused_receive_releases_and_destroys_the_new_snapshot_only(tmp_path: Path) -> None:
    lab = refused_lab(tmp_path)
    with pytest.raises(StateError, match="was modified since the common snapshot .*rollback=yes"):
        lab.replicator.update(PAIR)
    new = f"{SRC_FS}@{lab.new_snapshot()}"
    assert lab.src.calls("zfs", "release") == [["zfs", "release", TAG, new]]
    assert lab.src.calls("zfs", "destroy") == [["zfs", "destroy", new]]  # never the base
    assert lab.index("src", "zfs", "release", TAG, new) < lab.index("src", "zfs", "destroy", new)
    assert not lab.dst.calls("zfs", "destroy") and not lab.dst.calls("zfs", "release")


def test_a_failed_cleanup_leaves_the_run_s_own_error_as_it_was(tmp_path: Path) -> None:
    lab = refused_lab(tmp_path, destroy=(1, "cannot destroy snapshot: I/O error"))
    with pytest.raises(StateError) as caught:
        lab.replicator.update(PAIR)
    message = str(caught.value)
    assert "was modified since the common snapshot" in message and "I/O error" not in message
    assert "I/O error" not in lab.status().error


def test_a_new_snapshot_the_destination_received_after_all_stays(tmp_path: Path) -> None:
    """zfs receive can fail after it took the stream (a mount that fails): the new
    snapshot is the common one then, and stays on the source, held."""
    lab = refused_lab(tmp_path)
    lab.failures.clear()

    def received_then_failed() -> None:
        taken = listing(DST_FS, [(S1, 1, 1), (lab.new_snapshot(), 2, 0)])
        lab.dst.now(["zfs", "get", "-Hp", "-d"], taken)
        raise CommandError(["zfs", "receive"], "dst", 1, "cannot mount: busy", "zfs receive")

    lab.failures.append(received_then_failed)
    with pytest.raises(CommandError, match="cannot mount"):
        lab.replicator.update(PAIR)
    assert not lab.src.calls("zfs", "destroy") and not lab.src.calls("zfs", "release")


def test_a_stream_the_link_broke_asks_the_source_nothing_more(tmp_path: Path) -> None:
    """A stall or a cut link: over that link a cleanup would wait out each command's own
    timeout (minutes) after the stall limit; the snapshot waits for the next good run."""
    lab = refused_lab(tmp_path)
    lab.failures.clear()

    def stalled() -> None:
        raise TransportError("the stream stalled: no data for 5s after 4096 bytes; aborted")

    lab.failures.append(stalled)
    with pytest.raises(TransportError, match="stalled"):
        lab.replicator.update(PAIR)
    assert not lab.src.calls("zfs", "destroy") and not lab.src.calls("zfs", "release")


@pytest.mark.parametrize("kind", ["filesystem", "volume"])
def test_a_props_pair_sends_the_properties_but_never_the_mount(tmp_path: Path, kind: str) -> None:
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)]) + f"{DST_FS}\ttype\t{kind}\n")
    lab.src.on(["zfs", "send", "-nvP"], ESTIMATE)
    lab.replicator.update(make_pair(props=True))
    [(send, recv, _)] = lab.streams
    assert send[:3] == ["zfs", "send", "-p"]
    kept = ["-x", "mountpoint", "-x", "sharenfs", "-x", "sharesmb"] if kind == "filesystem" else []
    assert recv == ["zfs", "receive", "-s", *kept, DST_FS]  # 2.1 refuses -x on a volume


@pytest.mark.parametrize("probe", ["openzfs", "zfs-fuse"])
def test_a_recursive_line_s_child_is_received_unmounted_where_the_receive_can(
    tmp_path: Path, probe: str
) -> None:
    """A child's parent replica is read-only and may hold no directory to mount the child
    on (the source parent canmount=off): OpenZFS's receive leaves the child unmounted
    (``-u``, in its usage text); zfs-fuse's has no ``-u``. The line's own file system is
    received as any pair's."""
    text = OPENZFS_PROBE if probe == "openzfs" else FUSE_PROBE
    line = make_pair(recursive=True)
    for pair in (line, tree.child(line, "a")):
        lab = Lab(tmp_path / pair.fingerprint, text, text)
        base = named(pair.fingerprint, 2)
        lab.src.on(["zfs", "get"], listing(pair.source.fs, [(base, 1, 1)], owner=None))
        dest = listing(pair.destination.fs, [(base, 1, 1)], owner=pair.fingerprint)
        lab.dst.on(["zfs", "get"], dest)
        lab.src.on(["zfs", "send", "-nvP"], ESTIMATE)
        lab.replicator.update(pair)
        [(_, recv, _)] = lab.streams
        unmounted = pair.is_child and probe == "openzfs"
        assert recv[-1] == pair.destination.fs and ("-u" in recv) == unmounted, recv
        uses = lab.status(pair).extra["features"]["uses"]
        assert ("received unmounted" in uses) == unmounted


@pytest.mark.parametrize("kind", ["filesystem", "volume"])
def test_a_child_received_unmounted_is_kept_unmounted_at_boot(tmp_path: Path, kind: str) -> None:
    """``canmount=noauto`` on a file system child received unmounted (``zfs mount -a`` at
    boot would mount it, or fail where its parent's replica has no directory for it),
    once, by its initialize; a volume has no canmount, the line's own file system keeps
    the one it has."""
    line = make_pair(recursive=True)
    for pair in (line, tree.child(line, "a")):
        lab = Lab(tmp_path / pair.fingerprint)
        typed = f"{pair.source.fs}\ttype\t{kind}\n"
        lab.src.on(["zfs", "get"], listing(pair.source.fs, [], owner=None) + typed)
        missing = f"cannot open '{pair.destination.fs}': dataset does not exist"
        lab.dst.on(["zfs", "get"], "", missing, rc=1)
        lab.src.on(["zfs", "send", "-nvP"], ESTIMATE)
        lab.replicator.initialize(pair)
        noauto = ["zfs", "set", "canmount=noauto", pair.destination.fs]
        assert (noauto in lab.dst.calls("zfs", "set")) == (pair.is_child and kind == "filesystem")


def test_a_child_adopted_after_a_killed_initialize_is_kept_unmounted_at_boot(
    tmp_path: Path,
) -> None:
    """An initialize killed between its receive and its record leaves the replica to the
    next update, which records it: canmount=noauto then, as the initialize would have."""
    pair = tree.child(make_pair(recursive=True), "a")
    lab = Lab(tmp_path)
    base = named(pair.fingerprint, 2)
    lab.src.on(["zfs", "get"], listing(pair.source.fs, [(base, 1, 1)], owner=None))
    received = listing(pair.destination.fs, [(base, 1, 1)], owner=None)
    lab.dst.on(["zfs", "get"], received + f"{pair.destination.fs}\ttype\tfilesystem\n")
    lab.src.on(["zfs", "send", "-nvP"], ESTIMATE)
    lab.replicator.update(pair)
    sets = lab.dst.calls("zfs", "set")
    assert ["zfs", "set", f"zettabee:fingerprint={pair.fingerprint}", pair.destination.fs] in sets
    assert ["zfs", "set", "canmount=noauto", pair.destination.fs] in sets


def test_raw_is_refused_before_anything_happens_where_a_side_lacks_it(tmp_path: Path) -> None:
    lab = Lab(tmp_path, OPENZFS_PROBE, FUSE_PROBE)
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 0)]))
    pair = make_pair(raw=True)
    with pytest.raises(StateError, match="raw=yes, but the destination dst \\(zfs-fuse"):
        lab.replicator.update(pair)
    assert not lab.src.calls("zfs", "snapshot") and not lab.streams
    assert "raw=yes" in lab.status(pair).error


def test_raw_sends_raw_where_both_sides_have_it(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    pair = make_pair(raw=True)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)], owner=pair.fingerprint))
    lab.src.on(["zfs", "send", "-nvP"], ESTIMATE)
    lab.replicator.update(pair)
    [estimate] = lab.src.calls("zfs", "send", "-nvP")
    [(send, _, _)] = lab.streams
    assert send[:3] == ["zfs", "send", "-w"] and estimate[:4] == ["zfs", "send", "-nvP", "-w"]


def test_a_pruned_base_is_replaced_by_its_bookmark(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    pair = make_pair(bookmark=True, intermediate=True)
    fp = pair.fingerprint
    old = named(fp, 1)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [], owner=None, marks=[(old, 1)]))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(old, 1, 1)], owner=fp))
    report = lab.replicator.update(pair)
    new = lab.new_snapshot()
    [(send, _, _)] = lab.streams
    assert send == ["zfs", "send", "-i", f"{SRC_FS}#{old}", f"{SRC_FS}@{new}"]
    assert report.base == old
    assert lab.src.calls("zfs", "bookmark") == [
        ["zfs", "bookmark", f"{SRC_FS}@{new}", f"{SRC_FS}#{new}"]
    ]
    assert lab.src.calls("zfs", "destroy") == [["zfs", "destroy", f"{SRC_FS}#{old}"]]


def test_bookmark_demanded_on_zfs_fuse_is_refused(tmp_path: Path) -> None:
    lab = Lab(tmp_path, FUSE_PROBE, FUSE_PROBE)
    with pytest.raises(StateError, match="bookmark=yes, but the source src \\(zfs-fuse"):
        lab.replicator.update(make_pair(bookmark=True))


def test_purge_releases_stale_holds_and_release_lets_go_of_the_base(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S0, 5, 1), (S1, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S0, 5, 0), (S1, 1, 1)]))
    dry = lab.replicator.purge(PAIR, dry_run=True)
    assert [s.describe(done=False) for s in dry] == [
        f"would release hold {TAG} on src:{SRC_FS}@{S0}",
        f"would destroy src:{SRC_FS}@{S0}",
        f"would destroy dst:{DST_FS}@{S0}",
    ]
    assert not lab.src.calls("zfs", "release") and not lab.src.calls("zfs", "destroy")
    lab.replicator.purge(PAIR)
    assert lab.src.calls("zfs", "release") == [["zfs", "release", TAG, f"{SRC_FS}@{S0}"]]
    assert lab.index("src", "zfs", "release", TAG, f"{SRC_FS}@{S0}") < lab.index(
        "src", "zfs", "destroy", f"{SRC_FS}@{S0}"
    )
    assert not lab.dst.calls("zfs", "release")  # the base keeps its hold
    steps = lab.replicator.purge(PAIR, release=True)
    released = {s.target for s in steps if s.action == "release"}
    assert {f"src:{SRC_FS}@{S1}", f"dst:{DST_FS}@{S1}"} <= released


def test_an_interrupted_initialize_resumes_its_full_stream(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [], owner=None, token=TOKEN))
    full = resume_contents(S1).replace(f"incremental\t{S1}\t", "full\t")
    lab.src.on(["zfs", "send", "-nvP", "-t"], full)
    report = lab.replicator.initialize(PAIR)
    assert report.snapshot == S1
    assert lab.streams == [
        (["zfs", "send", "-t", TOKEN], ["zfs", "receive", "-s", DST_FS], 27393408)
    ]
    assert not lab.src.calls("zfs", "snapshot")  # no new full stream over the partial one
    assert ["zfs", "set", f"zettabee:fingerprint={FP}", DST_FS] in lab.dst.calls("zfs", "set")
    assert lab.dst.calls("zfs", "hold") == [["zfs", "hold", TAG, f"{DST_FS}@{S1}"]]


def test_initialize_step_by_step_holds_the_new_snapshot_once_on_each_side(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [], owner=None))
    lab.dst.on(["zfs", "get"], "", f"cannot open '{DST_FS}': dataset does not exist", rc=1)
    lab.src.on(["zfs", "send", "-nvP"], ESTIMATE)
    report = lab.replicator.initialize(PAIR)
    new = lab.new_snapshot()
    assert report.snapshot == new
    # held before it travels, and not asked again after (ZFS would refuse a second hold
    # under the same tag: "tag already exists")
    assert lab.src.calls("zfs", "hold") == [["zfs", "hold", TAG, f"{SRC_FS}@{new}"]]
    assert lab.index("src", "zfs", "hold", TAG, f"{SRC_FS}@{new}") < lab.index(
        "stream", "zfs", "send", f"{SRC_FS}@{new}", "|", "zfs", "receive", "-s", DST_FS
    )
    assert lab.dst.calls("zfs", "hold") == [["zfs", "hold", TAG, f"{DST_FS}@{new}"]]


def test_initialize_force_releases_the_destinations_holds_before_destroying(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)]))
    lab.replicator.initialize(PAIR, force=True)
    release = lab.index("dst", "zfs", "release", TAG, f"{DST_FS}@{S1}")
    assert release < lab.index("dst", "zfs", "destroy", "-r", DST_FS)


def test_a_hold_that_fails_for_another_reason_fails_the_run(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)]))
    lab.src.on(["zfs", "hold"], "", "cannot hold: permission denied", rc=1)
    with pytest.raises(ZettabeeError, match="zfs hold on src failed.*permission denied"):
        lab.replicator.update(PAIR)
    assert not lab.streams


# -- what status and the runtime check say about a partial receive --------------------


def health_with(entry: dict[str, Any], run_state: str, error: str = "") -> Health:
    status = Status(FP, state=run_state, action="update", error=error, extra={"resume": entry})
    return Health(PAIR, SYNCHRONIZED, status=status, run_state=run_state, runtime=5)


def test_runtime_warns_about_a_partial_receive_left_after_a_run_that_did_not_fail() -> None:
    entry = {"snapshot": S2, "since": 1_700_000_000, "runs": 3, "kept": 50 << 20}
    health = health_with(entry, IDLE)
    assert "about 50.0 MiB received, 3 runs so far" in health.resume_note
    outcome = checks.evaluate(checks.runtime_check([health]))
    assert outcome.code == 1
    assert S2 in outcome.output and "next update resumes it" in outcome.output


def test_runtime_critical_names_the_partial_receive_after_a_failure() -> None:
    health = health_with({"snapshot": S2, "runs": 2, "kept": 1 << 20}, FAILED, "zfs send failed")
    outcome = checks.evaluate(checks.runtime_check([health]))
    assert outcome.code == 2
    assert "last update failed: zfs send failed; partial receive of" in outcome.output
    assert S2 in outcome.output


def test_a_pair_that_stops_holding_releases_its_earlier_holds(tmp_path: Path) -> None:
    """hold=no after a time with holds: nothing held is left behind to pin a snapshot."""
    lab = Lab(tmp_path)
    pair = make_pair(hold=False)
    fp = pair.fingerprint
    old = named(fp, 1)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(old, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(old, 1, 1)], owner=fp))
    lab.replicator.update(pair)
    assert not lab.src.calls("zfs", "hold") and not lab.dst.calls("zfs", "hold")
    tag = hold_tag(fp, RID)
    assert lab.src.calls("zfs", "release") == [["zfs", "release", tag, f"{SRC_FS}@{old}"]]
    assert lab.dst.calls("zfs", "release") == [["zfs", "release", tag, f"{DST_FS}@{old}"]]
    # released before the prune destroys the old snapshot
    assert lab.index("src", "zfs", "release", tag, f"{SRC_FS}@{old}") < lab.index(
        "src", "zfs", "destroy", f"{SRC_FS}@{old}"
    )


def test_a_token_on_a_pair_that_does_not_resume_is_discarded(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    pair = make_pair(resume=False)
    fp = pair.fingerprint
    base = named(fp, 1)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(base, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(base, 1, 1)], owner=fp, token=TOKEN))
    lab.src.on(["zfs", "send", "-nvP"], ESTIMATE)
    lab.replicator.update(pair)
    assert lab.dst.calls("zfs", "receive", "-A") == [["zfs", "receive", "-A", DST_FS]]
    [(send, recv, _)] = lab.streams
    assert "-t" not in send and recv == ["zfs", "receive", DST_FS]  # not resumable either


def test_rollback_yes_rolls_the_destination_back_before_receiving(tmp_path: Path) -> None:
    lab = Lab(tmp_path, FUSE_PROBE, FUSE_PROBE)
    pair = make_pair(rollback=True)
    fp = pair.fingerprint
    base = named(fp, 1)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(base, 1, 1)], owner=None))
    dst_view = listing(DST_FS, [(base, 1, 1), ("local-extra", 7, 0)], owner=fp, lastsnap=base)
    lab.dst.on(["zfs", "get"], dst_view)
    lab.replicator.update(pair)
    [(send, recv, _)] = lab.streams
    rollback = lab.index("dst", "zfs", "rollback", "-r", f"{DST_FS}@{base}")
    assert rollback < lab.index("stream", *send, "|", *recv)
    assert recv == ["zfs", "receive", "-F", DST_FS]


def test_rollback_yes_releases_the_pairs_hold_on_what_it_rolls_back(tmp_path: Path) -> None:
    """The diverged snapshot is the pair's own (its source copy was destroyed): held on
    the destination, and a rollback would fail on it while held."""
    lab = Lab(tmp_path, FUSE_PROBE, FUSE_PROBE)
    pair = make_pair(rollback=True)
    fp = pair.fingerprint
    base, gone = (named(fp, i) for i in (1, 2))
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(base, 1, 0)], owner=None))
    dst_view = listing(DST_FS, [(base, 1, 0), (gone, 2, 1)], owner=fp, lastsnap=gone)
    lab.dst.on(["zfs", "get"], dst_view)
    lab.replicator.update(pair)
    release = lab.index("dst", "zfs", "release", hold_tag(fp, RID), f"{DST_FS}@{gone}")
    assert release < lab.index("dst", "zfs", "rollback", "-r", f"{DST_FS}@{base}")


def test_which_updates_go_in_one_round_trip() -> None:
    from zettabee.capabilities import Capabilities, plan_features
    from zettabee.host import LocalHost, SshHost, SshTarget

    fuse = Capabilities("h", "p", "zfs-fuse", holds=True)
    modern = Capabilities("h", "p", "OpenZFS", holds=True, resumable=True, estimates=True)
    remote, here = SshHost(SshTarget("src")), LocalHost()
    needs = fastpath.needs_steps
    assert needs(PAIR, remote, here, plan_features(fuse, fuse), None) == ""  # holds fold in
    # The estimate and the resume bookkeeping fold into the script over ssh, not mbuffer's.
    assert needs(PAIR, remote, here, plan_features(modern, modern), None) == ""
    assert "resume token" in needs(PAIR, remote, here, plan_features(fuse, fuse), TOKEN)
    assert "remote" in needs(
        PAIR, remote, SshHost(SshTarget("dst")), plan_features(fuse, fuse), None
    )
    assert "this host" in needs(PAIR, here, here, plan_features(fuse, fuse), None)
    mbuffer = make_pair(transport="mbuffer")
    assert needs(mbuffer, remote, here, plan_features(fuse, fuse), None) == "transport=mbuffer"
    assert needs(mbuffer, remote, here, plan_features(modern, modern), None) == (
        "transport=mbuffer, size estimate, resumable receive"
    )
    assert (
        needs(
            mbuffer, remote, here, plan_features(modern, modern), None, streams=("ssh", "mbuffer")
        )
        == "size estimate, resumable receive"
    )


def test_a_status_that_cannot_be_written_fails_the_run_naming_the_directory_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab(tmp_path)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(S1, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)]))

    def full(path: Path, text: str, mode: int = 0o640, durable: bool = True) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("zettabee.state.write_atomic", full)
    with pytest.raises(StateError) as caught:
        lab.replicator.update(PAIR)
    message = str(caught.value)
    assert message.startswith(f"{PAIR.name}: cannot write")
    assert str(lab.store.state_dir) in message and "No space left on device" in message
    assert "free space" in message and "check_zettabee_runtime" in message
    assert message.count(PAIR.name) == 1
    assert not lab.streams  # nothing is sent that the status could not record


# -- the replica id: two backup servers under one pair line, and names from before it ---


def test_the_first_update_after_the_replica_id_goes_on_from_a_base_named_before_it(
    tmp_path: Path,
) -> None:
    """A pair initialized before the replica id: its base, ``zettabee.<fp>.<stamp>`` held
    under ``zettabee.<fp>``, is the common snapshot as ever (no resend); the new snapshot
    and its holds carry the replica id; the old base's holds are released under their
    own tag and it goes, as every update's old base."""
    lab = Lab(tmp_path, FUSE_PROBE, FUSE_PROBE)
    old = named(FP, 1, rid=None)
    lab.src.on(["zfs", "get"], listing(SRC_FS, [(old, 1, 1)], owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(old, 1, 1)]))
    report = lab.replicator.update(PAIR)
    new = lab.new_snapshot()
    assert report.base == old and new.startswith(f"zettabee.{FP}.{RID}.2")
    assert lab.src.calls("zfs", "hold") == [["zfs", "hold", TAG, f"{SRC_FS}@{new}"]]
    assert lab.dst.calls("zfs", "hold") == [["zfs", "hold", TAG, f"{DST_FS}@{new}"]]
    assert lab.src.calls("zfs", "release") == [["zfs", "release", OLD_TAG, f"{SRC_FS}@{old}"]]
    assert lab.dst.calls("zfs", "release") == [["zfs", "release", OLD_TAG, f"{DST_FS}@{old}"]]
    assert lab.src.calls("zfs", "destroy") == [["zfs", "destroy", f"{SRC_FS}@{old}"]]


def test_another_backup_server_s_snapshots_and_holds_on_the_source_are_left_alone(
    tmp_path: Path,
) -> None:
    """Two backup servers pull one source under one pair line (one fingerprint): the
    other's snapshots, older and newer than this one's base and held under its own tag,
    are neither released nor destroyed; this one's old base goes."""
    lab = Lab(tmp_path, FUSE_PROBE, FUSE_PROBE)
    theirs_old, theirs_new = named(FP, 1, OTHER_RID), named(FP, 3, OTHER_RID)
    held = [(theirs_old, 7, 1), (S1, 1, 1), (theirs_new, 8, 1)]
    lab.src.on(["zfs", "get"], listing(SRC_FS, held, owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S1, 1, 1)]))
    report = lab.replicator.update(PAIR)
    assert report.base == S1
    assert lab.src.calls("zfs", "release") == [["zfs", "release", TAG, f"{SRC_FS}@{S1}"]]
    assert lab.src.calls("zfs", "destroy") == [["zfs", "destroy", f"{SRC_FS}@{S1}"]]


def test_purge_leaves_another_backup_server_s_snapshots_on_the_source(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    theirs = named(FP, 1, OTHER_RID)
    held = [(theirs, 7, 1), (S0, 5, 1), (S1, 1, 1)]
    lab.src.on(["zfs", "get"], listing(SRC_FS, held, owner=None))
    lab.dst.on(["zfs", "get"], listing(DST_FS, [(S0, 5, 0), (S1, 1, 1)]))
    steps = lab.replicator.purge(PAIR, release=True)
    assert not [s for s in steps if theirs in s.target]
    assert not [argv for argv in lab.src.calls("zfs") if argv[-1] == f"{SRC_FS}@{theirs}"]
    assert f"released hold {TAG} on src:{SRC_FS}@{S1}" in [s.describe(True) for s in steps]


def one_round_trip_plan(base: str, resume: bool = False) -> fastpath.Plan:
    """The script's plan of an update from ``base`` on the source, holds on both sides."""
    from zettabee import update, zfs
    from zettabee.capabilities import Capabilities, plan_features
    from zettabee.views import DestView

    caps = Capabilities("h", "p", "zfs", holds=True, resumable=resume, pool_guid=POOL_GUID)
    run = PairRun(PAIR, None, None, plan_features(caps, caps), None, None, None, None,
                  DestView({}, []))  # type: ignore[arg-type]  # fmt: skip
    return update._plan(run, zfs.Snapshot(SRC_FS, base, 1, 0), S2, listing=True)


def test_the_one_round_trip_lets_go_of_a_base_of_this_replica_or_from_before_it() -> None:
    for base, tag in ((S1, TAG), (named(FP, 1, rid=None), OLD_TAG)):
        plan = one_round_trip_plan(base)
        assert [(name, list(argv)) for name, argv in plan.then] == [
            ("hold", ["zfs", "hold", TAG, f"{SRC_FS}@{S2}"]),
            ("release", ["zfs", "release", tag, f"{SRC_FS}@{base}"]),
            ("destroy", ["zfs", "destroy", f"{SRC_FS}@{base}"]),
        ]
    assert one_round_trip_plan(S1, resume=True).hold == TAG  # held before it is sent


@pytest.mark.parametrize("base", ["manual-before-upgrade", named(FP, 1, OTHER_RID)])
def test_the_one_round_trip_leaves_a_base_that_is_not_this_replica_s(base: str) -> None:
    plan = one_round_trip_plan(base)
    assert [name for name, _ in plan.then] == ["hold"]
