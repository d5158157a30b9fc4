"""A real Pacemaker 2 cluster for tests, without systemd: Debian's corosync and
pacemakerd started by PID in network-and-mount namespaces (tests/netns.py).

Two nodes joined by a veth pair whose addresses exist only inside the namespaces:
``pcmk1`` runs corosync and Pacemaker, ``pcmk2`` runs corosync alone, which is enough for
Pacemaker's node alerts (membership comes from corosync) at a fraction of the cost. Each
node gets its own /var/lib/pacemaker, /var/log/pacemaker, /var/lib/corosync and
/etc/corosync and /run (bind mounts inside its namespace), so the host's are left as
found.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

from tests.netns import Namespace
from tests.waiting import wait_until

__all__ = ["COROSYNC_CONF", "PacemakerLab", "tree_contents"]

CLUSTER = "clusteralert-lab"
SUBNET = "10.213.0"
COROSYNC_CONF = """\
totem {{
    version: 2
    cluster_name: {cluster}
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 3000
}}
logging {{
    to_stderr: yes
    to_logfile: no
    to_syslog: no
    timestamp: on
}}
quorum {{
    provider: corosync_votequorum
    two_node: 1
    wait_for_all: 0
}}
nodelist {{
{nodes}
}}
"""
_NODE = """\
    node {{
        ring0_addr: {address}
        name: {name}
        nodeid: {nodeid}
    }}"""
# Host directories each node gets its own copy of, and who owns them.
_PRIVATE = {
    "/var/lib/pacemaker": ("hacluster", "haclient", 0o750, ("cib", "pengine", "blackbox", "cores")),
    "/var/log/pacemaker": ("hacluster", "haclient", 0o770, ()),
    "/var/lib/corosync": ("root", "root", 0o755, ()),
    "/etc/corosync": ("root", "root", 0o755, ()),
    # corosync's lock and PID file, the agents' state files.
    "/run": ("root", "root", 0o755, ("resource-agents", "fence-agents", "lock")),
}


@dataclass
class Node:
    name: str
    nodeid: int
    address: str
    root: Path
    ns: Namespace
    corosync: int | None = None
    pacemakerd: int | None = None
    logs: list[Path] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return self.ns.run(*args, timeout=timeout, check=check)


def _own(path: Path, user: str, group: str, mode: int) -> None:
    os.chown(path, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid)
    path.chmod(mode)


class PacemakerLab:
    def __init__(self, root: Path, names: tuple[str, ...] = ("pcmk1", "pcmk2")):
        self.root = root
        self.nodes: list[Node] = []
        nodelist = "\n".join(
            _NODE.format(address=f"{SUBNET}.{i}", name=name, nodeid=i)
            for i, name in enumerate(names, 1)
        )
        conf = COROSYNC_CONF.format(cluster=CLUSTER, nodes=nodelist)
        try:
            for i, name in enumerate(names, 1):
                node_root = root / name
                binds: dict[str, Path] = {}
                for target, (user, group, mode, subdirs) in _PRIVATE.items():
                    if not Path(target).is_dir():
                        continue
                    private = node_root / target.strip("/").replace("/", "-")
                    private.mkdir(parents=True)
                    for sub in subdirs:
                        (private / sub).mkdir()
                        _own(private / sub, user, group, mode)
                    _own(private, user, group, mode if not subdirs else 0o755)
                    binds[target] = private
                conf_dir = binds.get("/etc/corosync", node_root / "etc-corosync")
                conf_dir.mkdir(parents=True, exist_ok=True)
                (conf_dir / "corosync.conf").write_text(conf)
                ns = Namespace(name, binds)
                self.nodes.append(Node(name, i, f"{SUBNET}.{i}", node_root, ns))
            self._link()
        except BaseException:
            self.close()
            raise

    def _link(self) -> None:
        """A veth pair from each node to the first, addresses only inside."""
        first = self.nodes[0]
        for other in self.nodes[1:]:
            here, there = f"to{other.nodeid}", f"to{first.nodeid}"
            first.run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
            first.run("ip", "link", "set", there, "netns", str(other.ns.pid))
            for node, dev in ((first, here), (other, there)):
                node.run("ip", "addr", "add", f"{node.address}/24", "dev", dev)
                node.run("ip", "link", "set", dev, "up")

    def conf_path(self, node: Node) -> Path:
        private = node.root / "etc-corosync"
        return private / "corosync.conf"

    def start_corosync(self, node: Node) -> None:
        log = node.root / f"corosync-{len(node.logs)}.log"
        node.logs.append(log)
        node.corosync = node.ns.start("corosync", "-f", "-c", str(self.conf_path(node)), log=log)
        wait_until(
            lambda: "Quorate" in node.run("corosync-quorumtool", "-s", check=False),
            60,
            f"corosync on {node.name} to form a quorate membership",
            interval=0.5,
        )

    def stop_corosync(self, node: Node) -> None:
        assert node.corosync is not None
        node.ns.stop(node.corosync, 60)
        node.corosync = None

    def start_pacemaker(self, node: Node) -> None:
        self._seed_cib(node)
        log = node.root / "pacemakerd.log"
        node.logs.append(log)
        node.pacemakerd = node.ns.start(
            "pacemakerd", log=log, env={"PCMK_logfacility": "none", "PCMK_logpriority": "info"}
        )
        # The first DC election waits for dc-deadtime (see _seed_cib).
        self.wait_idle(node, 180)

    def _seed_cib(self, node: Node) -> None:
        """A CIB on disk before the first start, with dc-deadtime 2 s: the first election
        waits that long for a DC elsewhere to speak up (20 s by default), and in this lab
        no other node runs Pacemaker. Without a .sig file Pacemaker only warns."""
        cib_dir = node.root / "var-lib-pacemaker" / "cib"
        schemas = Path("/usr/share/pacemaker").glob("pacemaker-[0-9]*.rng")
        latest = max(schemas, key=lambda p: tuple(int(n) for n in p.stem.split("-")[1].split(".")))
        cib = cib_dir / "cib.xml"
        cib.write_text(
            f'<cib validate-with="{latest.stem}" epoch="1" num_updates="0" admin_epoch="0">'
            "<configuration><crm_config>"
            '<cluster_property_set id="cib-bootstrap-options">'
            '<nvpair id="cib-bootstrap-options-dc-deadtime" name="dc-deadtime" value="2s"/>'
            "</cluster_property_set></crm_config>"
            "<nodes/><resources/><constraints/></configuration><status/></cib>\n"
        )
        _own(cib, "hacluster", "haclient", 0o600)

    def wait_idle(self, node: Node, timeout: float = 120) -> None:
        """Until the node's controller is the DC and has nothing left to do."""
        wait_until(
            lambda: "S_IDLE" in node.run("crmadmin", "-S", node.name, check=False),
            timeout,
            f"Pacemaker on {node.name} to settle (S_IDLE)",
            interval=0.5,
        )

    def close(self) -> None:
        for node in reversed(self.nodes):
            if node.pacemakerd is not None:
                # pacemakerd stops its children, then exits; resources are stopped first.
                node.ns.stop(node.pacemakerd, 180)
                node.pacemakerd = None
            if node.corosync is not None:
                self.stop_corosync(node)
        for node in self.nodes:
            node.ns.close()
        self.nodes.clear()

    def logs(self) -> str:
        """Every daemon log and Pacemaker's detail log, for a failing test's report."""
        parts = []
        for node in self.nodes:
            paths = [*node.logs, node.root / "var-log-pacemaker" / "pacemaker.log"]
            for path in paths:
                if path.is_file():
                    text = path.read_text(errors="replace")[-20000:]
                    parts.append(f"--- {node.name} {path.name}\n{text}")
        return "\n".join(parts)


def tree_contents(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its contents: to check it is left as found."""
    if not path.is_dir():
        return {}
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(path.rglob("*"))
    }
