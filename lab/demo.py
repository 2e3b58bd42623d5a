"""``make demo``: zettabee's main job on a built-in lab, explained as it runs.

A source host (a network namespace with its own sshd, pool ``srcpool``) is replicated into
``dstpool`` on this machine over real SSH; then status, the check plugins and a passive
result received by a real NSCA daemon. The lab stays up afterwards; ``make demo-clean``
removes it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lab.zfslab import ZfsLab

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def bin_path(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


class Demo:
    def __init__(self) -> None:
        self.lab = ZfsLab("demo")
        self.etc = self.lab.root / "etc"
        self.settings = self.etc / "zettabee.ini"
        self.pairs = self.etc / "zettabee.cfg"
        self.env = dict(os.environ, ZETTABEE_SETTINGS=str(self.settings))

    def show(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command as the user would type it, and print both."""
        shown = [Path(argv[0]).name, *argv[1:]]
        print(f"{DIM}# {shlex.join(shown)}{RESET}", flush=True)
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env)
        out = (proc.stdout + proc.stderr).rstrip()
        if out:
            print(out)
        print(f"{DIM}  (exit {proc.returncode}){RESET}", flush=True)
        if check and proc.returncode not in (0,):
            raise SystemExit(f"demo: {shown[0]} failed, see above")
        return proc

    def remote(self, *command: str) -> None:
        src = self.lab.source
        print(f"{DIM}# ssh root@{src.address} {shlex.join(command)}{RESET}", flush=True)
        src.run(*command)

    def run(self) -> None:
        src = self.lab.source
        say("1. The lab: a source host in a network namespace, reached over real SSH")
        self.lab.up()
        print(f"source host {src.address} (its own sshd, host key pinned in {src.known_hosts})")
        print(
            f"pools: srcpool on the source, dstpool here; zfs-fuse on sparse files in {self.lab.root}"
        )

        say("2. The configuration: settings and the pair file")
        self.etc.mkdir(parents=True, exist_ok=True)
        self.nsca_port = 15667
        self.settings.write_text(
            "[paths]\n"
            f"pairs = {self.pairs}\n"
            f"state_dir = {self.lab.root}/state\nlog_dir = {self.lab.root}/log\n"
            f"lock_dir = {self.lab.root}/run\nspool_dir = {self.lab.root}/spool\n"
            f"known_hosts = {src.known_hosts}\n\n"
            "[defaults]\n"
            f"sshkey = {src.key}\n"
            "wlag = 1h\nclag = 4h\n\n"
            "[monitoring]\nhost_name = backup-server\npassive = nsca\n\n"
            f"[nsca]\nhost = 127.0.0.1\nport = {self.nsca_port}\n"
            "password = demo-secret\nencryption = xor\n"
        )
        os.chmod(self.settings, 0o600)
        self.pairs.write_text(
            "# source                destination          options\n"
            f"{src.address}:srcpool/data   localhost:dstpool/data   transport=ssh\n"
        )
        print(f"{self.settings}:\n{self.settings.read_text()}")
        print(f"{self.pairs}:\n{self.pairs.read_text()}")
        print(f"export ZETTABEE_SETTINGS={self.settings}")

        say("3. Some data on the source")
        self.remote("zfs", "create", "srcpool/data")
        data = Path(src.mountpoint) / "data"
        self.remote("dd", "if=/dev/urandom", f"of={data}/photos.bin", "bs=1M", "count=64")
        self.remote("cp", "-r", "/usr/share/doc/openssh-client", f"{data}/docs")
        os.sync()

        zb = bin_path("zettabee")
        say("4. setup checks the pair end to end")
        self.show(zb, "setup")
        say("5. initialize: the full transfer (quiet on success; --verbose says what it did)")
        self.show(zb, "--verbose", "initialize", "data")
        say("6. status")
        self.show(zb, "status")
        say("7. change the source, then update (what cron runs)")
        self.remote("dd", "if=/dev/urandom", f"of={data}/new.bin", "bs=1M", "count=16")
        self.remote("rm", "-r", f"{data}/docs")
        os.sync()
        self.show(zb, "--verbose", "update", "data")
        self.show(zb, "status", "--fullstatus")
        sums = self.lab.checksum_tree(data)
        same = bool(sums) and sums == self.lab.checksum_tree(self.lab.dst_mountpoint / "data")
        print(f"destination identical to the source (sha256 of all {len(sums)} files): {same}")
        if not same:
            raise SystemExit("demo: the replica differs from the source")

        say("8. The check plugins, as Nagios or Icinga run them")
        for plugin in ("check_zettabee_lag", "check_zettabee_runtime"):
            if shutil.which(bin_path(plugin)):
                self.show(bin_path(plugin), "data", check=False)
                self.show(bin_path(plugin), "-w", "0:0", "data", check=False) if plugin.endswith(
                    "lag"
                ) else None
        say("9. A passive result after a cron run: replicate -> NSCA -> the monitoring server")
        self.passive()

        say("Your turn")
        print(
            f"export ZETTABEE_SETTINGS={self.settings}\n"
            "zettabee status --fullstatus          # every pair\n"
            "zettabee update data --debug          # every command, pasteable, with timings\n"
            "zettabee purge --dry-run data         # what would be destroyed\n"
            "check_zettabee_lag --all              # one check over every pair\n"
            f"ls {data}  and  ls {self.lab.dst_mountpoint / 'data'}\n"
            "make demo-clean                       # remove the lab"
        )
        print(f"(the commands live in {Path(sys.executable).parent}; "
              f"`. {Path(sys.executable).parent}/activate` puts them on PATH)")  # fmt: skip

    def passive(self) -> None:
        from lab.nscad import NscaDaemon

        replicate = bin_path("replicate")
        if not shutil.which(replicate):
            print("(replicate is not installed yet)")
            return
        workdir = self.lab.root / "nsca"
        shutil.rmtree(workdir, ignore_errors=True)
        with NscaDaemon(
            password="demo-secret", decryption=1, port=self.nsca_port, workdir=workdir,
            capture_syslog=False,
        ) as nscad:  # fmt: skip
            print(f"a real nsca daemon listens on 127.0.0.1:{nscad.port} "
                  f"and writes what it receives to {nscad.command_file}")  # fmt: skip
            self.show(replicate, "--all")
            nscad.wait_for(2, timeout=15)
            print(f"{DIM}# cat {nscad.command_file}{RESET}")
            print(nscad.command_file.read_text().rstrip())
        print("(the demo stops its nsca daemon again; the lab itself stays up)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__)
    parser.add_argument("--clean", action="store_true", help="tear the demo lab down")
    args = parser.parse_args(argv)
    if args.clean:
        lab = ZfsLab("demo")
        lab.down()
        shutil.rmtree(lab.root, ignore_errors=True)
        print("demo lab removed: no namespace, sshd, pool, mount or zfs-fuse of the demo left")
        return 0
    started = time.monotonic()
    Demo().run()
    print(f"\n(demo finished in {time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
