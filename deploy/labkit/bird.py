"""BIRD 2 in the lab: the router's and the POPs' configs, and one BIRD process per namespace.

The router prefers the POP with the highest local-pref; moving the VIPs is a new config loaded with
`birdc configure`. A POP announces the VIPs while their static protocols are enabled.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deploy.labkit.netns import Netns, NetnsError, wait_until

__all__ = [
    "ANYCAST_AS",
    "ROUTER_AS",
    "Bird",
    "BirdError",
    "Peer",
    "bird_missing",
    "pop_config",
    "router_config",
]

ROUTER_AS = 65000
"""The "internet": one transit AS all POPs connect to."""
ANYCAST_AS = 65100
"""The company's AS, announced from every POP (as real anycast deployments do)."""
VIP_PROTOCOLS = '"vip*"'
"""birdc pattern of the POP's static protocols holding the VIP routes; enabled = announced."""


class BirdError(NetnsError):
    """BIRD failed to start, rejected a config, or a session did not come up."""


def bird_missing() -> str | None:
    """Why BIRD cannot run here, or None."""
    for binary in ("bird", "birdc"):
        if shutil.which(binary) is None:
            return f"{binary} not found: apt-get install bird2"
    return None


@dataclass(frozen=True)
class Peer:
    """One router-POP link: the POP's name and both ends' addresses."""

    pop: str
    router4: str
    pop4: str
    router6: str
    pop6: str


def _session(name: str, local: str, neighbor: str, local_as: int, peer_as: int, body: str) -> str:
    return (
        f"protocol bgp {name} {{\n"
        f"  local {local} as {local_as};\n"
        f"  neighbor {neighbor} as {peer_as};\n"
        "  hold time 9; keepalive time 3; connect delay time 1; connect retry time 1;\n"
        "  error wait time 1, 5;\n"
        f"{body}}}\n"
    )


def router_config(router_id: str, peers: list[Peer], prefs: dict[str, int], log: Path) -> str:
    """The "internet" router: eBGP to every POP, best VIP route into the kernel.

    `prefs` is each POP's local-pref; the highest wins. Import tables keep the POPs' routes, so
    a `configure` with other prefs re-runs the import filters without a route refresh.
    """
    text = (
        f'log "{log}" all;\nrouter id {router_id};\n'
        "protocol device { scan time 10; }\n"
        "protocol kernel kernel4 { ipv4 { import none; export all; }; merge paths off; }\n"
        "protocol kernel kernel6 { ipv6 { import none; export all; }; merge paths off; }\n"
    )
    for peer in peers:
        pref = prefs.get(peer.pop, 100)
        for family, local, neighbor in (
            ("ipv4", peer.router4, peer.pop4),
            ("ipv6", peer.router6, peer.pop6),
        ):
            channel = (
                f"  {family} {{\n    import table on;\n"
                f"    import filter {{ bgp_local_pref = {pref}; accept; }};\n"
                "    export none;\n  };\n"
            )
            name = f"{peer.pop}_{family[-1]}"
            text += _session(name, local, neighbor, ROUTER_AS, ANYCAST_AS, channel)
    return text


def pop_config(router_id: str, peer: Peer, vip4: str, vip6: str, log: Path) -> str:
    """A POP: eBGP to the router, exporting only the VIP routes of its static protocols.

    The static protocols start disabled: the lab enables them once the POP can serve.
    """
    text = (
        f'log "{log}" all;\nrouter id {router_id};\n'
        "protocol device { scan time 10; }\n"
        f"protocol static vip4 {{ disabled yes; ipv4; route {vip4}/32 blackhole; }}\n"
        f"protocol static vip6 {{ disabled yes; ipv6; route {vip6}/128 blackhole; }}\n"
    )
    for family, local, neighbor, source in (
        ("ipv4", peer.pop4, peer.router4, "vip4"),
        ("ipv6", peer.pop6, peer.router6, "vip6"),
    ):
        channel = f'  {family} {{\n    import none;\n    export where proto = "{source}";\n  }};\n'
        name = f"up_{family[-1]}"
        text += _session(name, local, neighbor, ANYCAST_AS, ROUTER_AS, channel)
    return text


class Bird:
    """One BIRD daemon in a namespace, with its own config file and control socket."""

    def __init__(self, ns: Netns, workdir: Path, name: str) -> None:
        self.ns = ns
        self.name = name
        self.conf = workdir / f"bird-{name}.conf"
        self.socket = workdir / f"bird-{name}.ctl"
        self.log = workdir / f"bird-{name}.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self, config: str) -> None:
        """Write the config, check it, and run BIRD in the foreground of a child process."""
        self.conf.write_text(config)
        check = self.ns.run(["bird", "-p", "-c", str(self.conf)], check=False)
        if check.returncode != 0:
            raise BirdError(f"bird {self.name}: config rejected: {check.stderr.strip()}")
        self.proc = self.ns.popen(
            ["bird", "-f", "-c", str(self.conf), "-s", str(self.socket)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_until(lambda: self._answers() or not self.alive(), 10):
            raise BirdError(f"bird {self.name}: control socket {self.socket} never answered")
        if not self.alive():
            raise BirdError(f"bird {self.name} exited at start: see {self.log}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _answers(self) -> bool:
        return self.socket.exists() and self.birdc("show status", check=False).returncode == 0

    def birdc(self, command: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one birdc command against this daemon (`-r` unless it changes state)."""
        # birdc talks over the Unix socket, so it needs no namespace of its own.
        result = subprocess.run(
            ["birdc", "-s", str(self.socket), *command.split()],
            capture_output=True,
            text=True,
            timeout=15,
        )
        failed = result.returncode != 0 or re.search(
            r"error|unknown|no protocols", result.stdout, re.I
        )
        if check and failed:
            raise BirdError(
                f"birdc {self.name} {command!r}: exit {result.returncode}\n{result.stdout}"
            )
        return result

    def configure(self, config: str) -> None:
        """Load a changed config (the BGP sessions stay up; import filters re-run)."""
        self.conf.write_text(config)
        out = self.birdc("configure").stdout
        if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
            if "Reconfiguration already in progress" in out or "Configuration OK" in out:
                return
            raise BirdError(f"birdc {self.name} configure: {out.strip()}")

    def set_protocols(self, pattern: str, enabled: bool) -> None:
        """`birdc enable|disable PATTERN` (for static protocols: a real announce or withdraw)."""
        self.birdc(f"{'enable' if enabled else 'disable'} {pattern}")

    def established(self, names: list[str]) -> bool:
        """Whether every named BGP session is Established."""
        out = self.birdc("show protocols", check=False).stdout
        states = {
            words[0]: words[-1]
            for words in (line.split() for line in out.splitlines())
            if len(words) >= 5
        }
        return all(states.get(n) == "Established" for n in names)

    def wait_established(self, names: list[str], timeout: float = 30.0) -> None:
        if not wait_until(lambda: self.established(names), timeout, 0.1):
            out = self.birdc("show protocols", check=False).stdout
            raise BirdError(f"bird {self.name}: sessions not established in {timeout:g}s:\n{out}")

    def stop(self) -> None:
        if self.proc is not None:
            self.ns.stop(self.proc)
            self.proc = None
