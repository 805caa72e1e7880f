"""Starting and stopping the brokers the scripts compare: shardmq and Debian's RabbitMQ.

Shared by perf/ (benchmarks) and tests/differential (conformance against RabbitMQ). Everything
listens on 127.0.0.1 on free ports, with data under a directory the caller owns, and is stopped
by PID (RabbitMQ's epmd detaches from its parent, so it is found by its ERL_EPMD_PORT).
"""

import os
import signal
import socket
import subprocess
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def wait_port(port, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """pid and all its descendants, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def cpu_seconds(pids):
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_bytes(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def epmd_pids(epmd_port):
    """The epmd daemons started with ERL_EPMD_PORT=epmd_port (they detach from their parent)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"epmd" not in f.read():
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"ERL_EPMD_PORT={epmd_port}".encode() in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            pass
    return found


class Broker:
    def __init__(self, name, command, env, port, workdir):
        self.name, self.port, self.workdir = name, port, workdir
        self.epmd_port = env.get("ERL_EPMD_PORT") if name == "rabbitmq" else None
        self.log = open(os.path.join(workdir, f"{name}.log"), "w")
        self.process = subprocess.Popen(command, env=env, cwd=workdir, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_port(port, 60):
            self.stop()
            raise SystemExit(f"{name} did not start; see {self.log.name}")
        time.sleep(1)

    def pids(self):
        return descendants(self.process.pid)

    def stop(self):
        pids = self.pids()
        for pid in reversed(pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.epmd_port:
            for pid in epmd_pids(self.epmd_port):
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        self.log.close()


def start_shardmq_for_tests(workdir, root, config_extra=""):
    """target/debug/shardmq (built if missing) with 2 shards and queues spread over both, the
    set-up the client scenario scripts and the differential suite test against; `config_extra`
    is appended to its config file (TOML)."""
    binary = os.path.join(root, "target", "debug", "shardmq")
    if not os.path.exists(binary):
        subprocess.run(["cargo", "build", "-q", "--bin", "shardmq"], cwd=root, check=True)
    config = os.path.join(workdir, "shardmq.toml")
    with open(config, "w") as f:
        f.write('[queues]\nplacement = "balanced"\n' + config_extra)
    port = free_port()
    command = [binary, "--config", config, "--listen", f"127.0.0.1:{port}", "--shards", "2",
               "--data-dir", os.path.join(workdir, "shardmq-data"), "--log-level", "warn"]
    return Broker("shardmq", command, dict(os.environ), port, workdir)


def package_version(package):
    """The installed version of a Debian package, or "" if it is not installed."""
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", package],
                          capture_output=True, text=True)
    status, _, version = done.stdout.rpartition(" ")
    return version if done.returncode == 0 and status.endswith("installed") else ""


def ensure_rabbitmq_c():
    """The C client (librabbitmq) that perf/'s loadgen loads at run time; returns its version."""
    package = "librabbitmq4"
    if not package_version(package):
        print(f"installing {package} from Debian's packages ...", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
                       check=True, env=env)
    return package_version(package)


def ensure_rabbitmq():
    server = "/usr/lib/rabbitmq/bin/rabbitmq-server"
    if not os.path.exists(server):
        print("installing rabbitmq-server from Debian's packages ...", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        # The package would start a system-wide RabbitMQ on 5672; a policy-rc.d answering 101
        # ("action forbidden") keeps it from starting. Ours run on free ports, by PID.
        policy = "/usr/sbin/policy-rc.d"
        placed = not os.path.exists(policy)
        if placed:
            with open(policy, "w") as f:
                f.write("#!/bin/sh\nexit 101\n")
            os.chmod(policy, 0o755)
        try:
            subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
            subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                            "rabbitmq-server"], check=True, env=env)
        finally:
            if placed:
                os.remove(policy)
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"],
                             capture_output=True, text=True).stdout.strip()
    return server, version


def start_rabbitmq(workdir, server):
    port = free_port()
    base = os.path.join(workdir, "rabbitmq")
    os.makedirs(base, exist_ok=True)
    os.chmod(workdir, 0o777)
    os.chmod(base, 0o777)
    env = dict(os.environ,
               RABBITMQ_NODE_PORT=str(port), RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
               RABBITMQ_NODENAME=f"shardmq-peer{port}@localhost", RABBITMQ_DIST_PORT=str(free_port()),
               ERL_EPMD_PORT=str(free_port()), RABBITMQ_MNESIA_BASE=os.path.join(base, "mnesia"),
               RABBITMQ_LOG_BASE=os.path.join(base, "log"),
               RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(base, "plugins"),
               RABBITMQ_CONFIG_FILE=os.path.join(base, "rabbitmq"))
    return Broker("rabbitmq", [server], env, port, workdir)
