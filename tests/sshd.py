"""A real OpenSSH server for the pull transport's tests: a user CA, client keys and
certificates, and an `sshd` on a loopback port whose ForceCommand the test chooses.

The gateway users (`dataBackupSource`, `logBackupSource`) are real system users, because sshd
runs the ForceCommand through the user's shell with the user's uid. Three consequences shape
this module:

* Everything sshd reads *as the user* (AuthorizedPrincipalsFile) and everything the forced
  command touches must be reachable by those users. pytest's `tmp_path` lives under
  `/tmp/pytest-of-root/` (mode 0700, and pytest resets it), so these fixtures work under a
  directory of their own in /tmp (`gateway_tmp_path`, mode 0755).
* Files the users must share with root (the handover, the source store) get the group
  `backupgw` (both users are members) and setgid directories: `make_shared_dir`. A tree that
  root wrote with its usual umask can be handed over afterwards with `share_tree`.
* The test's own Python (pyenv, under /root, mode 0700; its libpython is there too) cannot be
  run by those users. `gateway_agent` therefore builds a venv from Debian's /usr/bin/python3
  with the project's dependencies (pinned to the versions the tests run with), outside /root,
  and a `backup-agent` wrapper that runs this checkout's `agent` package with it.

Skipped locally (a failure in CI) when `sshd`, `ssh-keygen` or Debian's python3 is missing.
"""

from __future__ import annotations

import fcntl
import grp
import hashlib
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent

SSHD = "/usr/sbin/sshd"  # sshd must be started by its absolute path (it re-executes itself)
GATEWAY_USERS = ("dataBackupSource", "logBackupSource")
GATEWAY_GROUP = "backupgw"
BASE_PYTHON = "/usr/bin/python3"
# The gateway users' venvs: one per set of requirements (its name ends in their digest), so
# checkouts that need different dependencies never rebuild a venv another run is using.
GATEWAY_VENVS = Path(os.environ.get("BACKUP_AGENT_TEST_VENVS", "/opt"))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (in CI this is a failure, not a skip)")
    pytest.skip(reason)


def _run(argv: Sequence[str | os.PathLike[str]], **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a setup command; raise with its output if it fails."""
    process = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, check=False, **kwargs
    )
    if process.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(map(os.fspath, argv))} exited {process.returncode}: "
            f"{process.stderr.strip() or process.stdout.strip()}"
        )
    return process


# ---------------------------------------------------------------- users, groups, directories


def ensure_gateway_users() -> None:
    """Create the users `dataBackupSource` and `logBackupSource` and the group `backupgw` that
    holds both, if missing (idempotent). The users have no password but are not *locked*:
    with `UsePAM no` sshd refuses every login to an account whose password field starts with
    `!`, which is what useradd writes by default."""
    if os.geteuid() != 0:
        _unavailable("the sshd fixtures create system users and must run as root")
    with open("/run/backup-agent-test-users.lock", "w") as lock:  # xdist workers, other runs
        fcntl.flock(lock, fcntl.LOCK_EX)
        _ensure_gateway_users()


def _ensure_gateway_users() -> None:
    try:
        grp.getgrnam(GATEWAY_GROUP)
    except KeyError:
        _run(["groupadd", "--system", GATEWAY_GROUP])
    for user in GATEWAY_USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            _run(
                [
                    "useradd",
                    "--system",
                    "--shell",
                    "/bin/sh",
                    "--home-dir",
                    "/nonexistent",
                    "--no-create-home",
                    user,
                ]
            )
        if _password_field(user).startswith("!"):
            _run(["usermod", "--password", "*", user])
        if user not in grp.getgrnam(GATEWAY_GROUP).gr_mem:
            _run(["usermod", "--append", "--groups", GATEWAY_GROUP, user])


def _password_field(user: str) -> str:
    with open("/etc/shadow", encoding="utf-8") as shadow:
        for line in shadow:
            name, _, rest = line.partition(":")
            if name == user:
                return rest.split(":", 1)[0]
    return ""


def _check_reachable(path: Path) -> None:
    """Raise ValueError unless every directory above `path` can be traversed by any user."""
    for parent in Path(path).resolve().parents:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            raise ValueError(
                f"{path}: its directory {parent} is not traversable by the gateway "
                "users (pytest's tmp_path is not); use the gateway_tmp_path fixture"
            )


def make_shared_dir(path: Path | str) -> Path:
    """Create `path` (and missing parents, mode 0755) as a directory that root and both gateway
    users can read and write: owner root, group `backupgw`, mode 2775. The setgid bit gives
    everything created inside the group `backupgw`; whether members may *write* to it depends on
    the mode its creator gives it (use `share_tree` after root wrote there with umask 022).
    Raise ValueError if a directory above it cannot be traversed by the users."""
    ensure_gateway_users()
    path = Path(path)
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    _check_reachable(path)
    os.chown(path, 0, grp.getgrnam(GATEWAY_GROUP).gr_gid)
    os.chmod(path, 0o2775)
    return path


def share_tree(path: Path | str) -> None:
    """Hand a tree root wrote over to the group `backupgw`: group `backupgw`, group read and
    write for everything, setgid and group-search for directories (like `chgrp -R backupgw;
    chmod -R g+rwX` plus g+s on directories). Symlinks are left alone."""
    gid = grp.getgrnam(GATEWAY_GROUP).gr_gid
    _share_one(os.fspath(path), gid, True)
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(directory, name)
            if not os.path.islink(full):
                _share_one(full, gid, name in dirs)


def _share_one(path: str, gid: int, is_dir: bool) -> None:
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    os.chown(path, -1, gid)
    mode |= stat.S_IRGRP | stat.S_IWGRP
    if is_dir:
        mode |= stat.S_IXGRP | stat.S_ISGID
    elif mode & stat.S_IXUSR:
        mode |= stat.S_IXGRP
    os.chmod(path, mode)


# ---------------------------------------------------------------- keys and certificates


class ClientKey(NamedTuple):
    """An ed25519 key pair without passphrase; usable where a path is expected (the private
    key)."""

    private: Path
    public: Path

    def __fspath__(self) -> str:
        return str(self.private)


def _keygen(path: Path, comment: str) -> None:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])


def make_client_key(directory: Path | str, name: str = "id_ed25519") -> ClientKey:
    """Create `<directory>/<name>` and `<name>.pub`. No certificate is ever written beside it
    as `<name>-cert.pub` (ssh would pick that up on its own): certificates live with the CA."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / name
    _keygen(private, f"{name}@backup-agent-tests")
    return ClientKey(private, directory / f"{name}.pub")


@dataclass
class SshCA:
    """A user certificate authority: `<directory>/ca` and `ca.pub` (what sshd's
    TrustedUserCAKeys names). Certificates are written to `<directory>/certs/`."""

    directory: Path
    key: Path = field(init=False)
    public: Path = field(init=False)
    _serial: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        (self.directory / "certs").mkdir(parents=True, exist_ok=True)
        self.key = self.directory / "ca"
        self.public = self.directory / "ca.pub"
        if not self.key.exists():
            _keygen(self.key, "backup-agent-tests user CA")

    def sign(
        self,
        pubkey: Path | str | ClientKey,
        principals: str | Sequence[str],
        validity: str = "-5m:+52w",
        force_command: str | None = None,
        source_address: str | None = None,
        identity: str = "backup-agent-test-sink",
    ) -> Path:
        """Sign the public key (a `.pub` path, or a ClientKey) for the principals and return the
        path of the new `-cert.pub` (a new file per call). `validity` is ssh-keygen's -V
        (`+1h`, `20200101:20200102`, `+1d:+2d`, ...)."""
        if isinstance(pubkey, ClientKey):
            pubkey = pubkey.public
        names = [principals] if isinstance(principals, str) else list(principals)
        self._serial += 1
        copy = self.directory / "certs" / f"{self._serial:03d}-{Path(pubkey).stem}.pub"
        shutil.copyfile(pubkey, copy)
        argv: list[str | Path] = [
            "ssh-keygen",
            "-q",
            "-s",
            self.key,
            "-I",
            identity,
            "-n",
            ",".join(names),
            "-V",
            validity,
            "-z",
            str(self._serial),
        ]
        if force_command is not None:
            argv += ["-O", f"force-command={force_command}"]
        if source_address is not None:
            argv += ["-O", f"source-address={source_address}"]
        _run([*argv, copy])
        cert = copy.with_name(copy.stem + "-cert.pub")
        if not cert.is_file():
            raise RuntimeError(f"ssh-keygen wrote no certificate {cert}")
        return cert

    def sign_expired(
        self, pubkey: Path | str | ClientKey, principals: str | Sequence[str], **options
    ) -> Path:
        """A certificate that was valid for one day in January 2020."""
        return self.sign(pubkey, principals, validity="20200101:20200102", **options)


# ---------------------------------------------------------------- the gateway's Python


@dataclass(frozen=True)
class GatewayAgent:
    """This checkout's agent, runnable by the gateway users.

    python      a venv python (Debian's /usr/bin/python3 + the project's dependencies)
    pythonpath  the directory holding the `agent` package (the checkout itself when the users
                can read it, else a copy made for this session)
    executable  a `backup-agent` wrapper script: PYTHONPATH + `python -m agent "$@"`
    """

    python: Path
    pythonpath: Path
    executable: Path

    def command(self, *args: str | os.PathLike[str]) -> str:
        """A shell command line for a ForceCommand, e.g.
        `command("--env-file", env_file, "gateway")`."""
        return shlex.join([str(self.executable), *map(os.fspath, args)])


def _requirements() -> list[str]:
    """The project's dependencies, pinned to the versions installed in the test's Python where
    there are any (so the gateway runs what the tests run), else as pyproject.toml says."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    with open(ROOT / "pyproject.toml", "rb") as file:
        specs = tomllib.load(file)["project"]["dependencies"]
    pinned = []
    for spec in specs:
        name = Requirement(spec).name
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(spec)
    return sorted(pinned)


def ensure_gateway_venv(directory: Path = GATEWAY_VENVS) -> Path:
    """Return the python of a venv in `directory` that any user can run, built from Debian's
    python3 with the project's dependencies; (re)build it when missing or incomplete (a stamp
    file, written last, records the requirements). Concurrent callers wait on a lock."""
    if not os.access(BASE_PYTHON, os.X_OK):
        _unavailable(
            f"{BASE_PYTHON} (Debian's python3) is missing; the gateway users cannot "
            f"run {sys.executable}"
        )
    requirements = _requirements()
    base_version = _run([BASE_PYTHON, "-c", "import sys; print(sys.version)"]).stdout.strip()
    stamp_text = "\n".join([f"# {base_version}", *requirements]) + "\n"
    digest = hashlib.sha256(stamp_text.encode()).hexdigest()[:12]
    venv = directory / f"backup-agent-test-venv-{digest}"
    python = venv / "bin" / "python"
    stamp = venv / ".backup-agent-test-requirements"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == stamp_text and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        # --without-pip: needs no ensurepip (python3-venv); the test's own pip installs into it.
        _run([BASE_PYTHON, "-m", "venv", "--without-pip", venv])
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as reqs:
            reqs.write("\n".join(requirements) + "\n")
            reqs.flush()
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "--python",
                    python,
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-warn-script-location",
                    "-r",
                    reqs.name,
                ]
            )
        _run(["chmod", "-R", "a+rX", venv])
        stamp.write_text(stamp_text)  # last: a build cut short is redone
    return python


def _world_readable(package: Path) -> bool:
    """Whether any user can reach `package` and read all its Python files."""
    try:
        _check_reachable(package)
    except ValueError:
        return False
    search = stat.S_IROTH | stat.S_IXOTH
    for directory, _dirs, files in os.walk(package):
        if os.stat(directory).st_mode & search != search:
            return False
        if any(
            not os.stat(os.path.join(directory, f)).st_mode & stat.S_IROTH
            for f in files
            if f.endswith(".py")
        ):
            return False
    return True


def install_gateway_agent(directory: Path) -> GatewayAgent:
    """Make this checkout's agent runnable by the gateway users; write the wrapper into
    `directory` (which they must be able to reach)."""
    python = ensure_gateway_venv()
    package = ROOT / "agent"
    if _world_readable(package):
        pythonpath = ROOT
    else:  # e.g. a checkout under /root: run a copy, made now, of the code under test
        pythonpath = directory / "src"
        shutil.copytree(
            package,
            pythonpath / "agent",
            ignore=shutil.ignore_patterns("__pycache__"),
            dirs_exist_ok=True,
        )
        _run(["chmod", "-R", "a+rX", pythonpath])
    bin_dir = directory / "bin"
    bin_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    executable = bin_dir / "backup-agent"
    executable.write_text(
        "#!/bin/sh\n"
        "# backup-agent of the checkout under test, for the gateway users (tests/sshd.py)\n"
        f"PYTHONPATH={shlex.quote(str(pythonpath))} PYTHONDONTWRITEBYTECODE=1 "
        f'exec {shlex.quote(str(python))} -m agent "$@"\n'
    )
    executable.chmod(0o755)
    return GatewayAgent(python, pythonpath, executable)


# ---------------------------------------------------------------- the server


def _openssh_version() -> tuple[int, int]:
    text = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else (0, 0)


@dataclass
class SshdServer:
    """A running sshd. `ssh_command` builds a client's argv that trusts only this server's
    host key and offers exactly the given key and certificate."""

    directory: Path
    host: str
    port: int
    ca: SshCA
    principals_dir: Path
    host_key_line: str  # "ssh-ed25519 AAAA..."
    known_hosts: Path  # "[127.0.0.1]:PORT ssh-ed25519 AAAA..."
    config: Path
    log_path: Path
    process: subprocess.Popen | None = None

    def ssh_options(
        self,
        key: Path | str | ClientKey,
        cert: Path | str | None,
        known_hosts: Path | str | None = None,
    ) -> list[str]:
        """The ssh options (everything but the destination): `-F none` so no ssh_config of
        this machine interferes, no pseudo-terminal, the global known_hosts off, the rest as the
        sink uses them."""
        options = ["-F", "none", "-T", "-p", str(self.port), "-i", os.fspath(key)]
        if cert is not None:
            options += ["-o", f"CertificateFile={os.fspath(cert)}"]
        return [
            *options,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={os.fspath(known_hosts or self.known_hosts)}",
            "-o",
            "GlobalKnownHostsFile=none",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
        ]

    def ssh_command(
        self,
        user: str,
        key: Path | str | ClientKey,
        cert: Path | str | None,
        *remote_args: str,
        known_hosts: Path | str | None = None,
    ) -> list[str]:
        """`ssh ... user@127.0.0.1 remote_args...`; cert None offers the plain key."""
        return [
            "ssh",
            *self.ssh_options(key, cert, known_hosts),
            f"{user}@{self.host}",
            *remote_args,
        ]

    def rsync_rsh(self, key: Path | str | ClientKey, cert: Path | str | None) -> str:
        """The value for `rsync --rsh` (`-e`)."""
        return shlex.join(["ssh", *self.ssh_options(key, cert)])

    def ssh(
        self,
        user: str,
        key: Path | str | ClientKey,
        cert: Path | str | None,
        *remote_args: str,
        known_hosts: Path | str | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        """Run `ssh_command(...)`; return the completed process (text, output captured)."""
        return subprocess.run(
            self.ssh_command(user, key, cert, *remote_args, known_hosts=known_hosts),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        """What sshd logged so far (LogLevel VERBOSE: accepted keys with certificate id and
        serial, refusals and why)."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 5.0) -> bool:
        """Whether `text` appears in the log within `timeout` seconds. (Lines of the
        unprivileged pre-auth process reach the log through the monitor, possibly after the
        client already saw the outcome.)"""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115  # sshd's, until stop
        try:
            # cwd "/": the forced command must not find the checkout by accident (its home
            # directory /nonexistent does not exist, so it stays in sshd's working directory).
            self.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + 10
        while "Server listening on" not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not start:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the listening sshd (by its pid); sessions still open end with their client."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


def _config_value(value: str, what: str) -> str:
    if any(c in value for c in "\n\r\0"):
        raise ValueError(f"{what} must be one line: {value!r}")
    return value


def _write_sshd(
    directory: Path,
    ca: SshCA,
    force_command: str,
    env: Mapping[str, str],
    principals: Mapping[str, Sequence[str]],
    extra_config: Sequence[str],
) -> SshdServer:
    directory.mkdir(mode=0o755, parents=True)
    host_key = directory / "ssh_host_ed25519_key"
    _keygen(host_key, "backup-agent-tests host key")
    host_key_line = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
    # sshd reads AuthorizedPrincipalsFile with the user's uid: world-readable, no secrets.
    principals_dir = directory / "principals"
    principals_dir.mkdir(mode=0o755)
    for user in GATEWAY_USERS:
        lines = principals.get(user, (user,))
        (principals_dir / user).write_text(
            "".join(f"{_config_value(p, 'a principal')}\n" for p in lines)
        )
        (principals_dir / user).chmod(0o644)
    port = free_port()
    config = directory / "sshd_config"
    lines = [
        f"ListenAddress 127.0.0.1:{port}",
        f"HostKey {host_key}",
        f"PidFile {directory / 'sshd.pid'}",
        f"TrustedUserCAKeys {ca.public}",
        f"AuthorizedPrincipalsFile {principals_dir}/%u",
        "AuthorizedKeysFile none",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "PermitRootLogin no",
        f"AllowUsers {' '.join(GATEWAY_USERS)}",
        "DisableForwarding yes",
        "PermitTTY no",
        "PermitUserRC no",
        "PermitUserEnvironment no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "LogLevel VERBOSE",
    ]
    if _openssh_version() >= (9, 8):
        # Newer sshd penalises a source address after failed logins, and every test client
        # comes from 127.0.0.1: the refusal tests would lock out the tests after them.
        lines.append("PerSourcePenalties no")
    for name, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or '"' in value:
            raise ValueError(f"cannot pass {name}={value!r} through sshd's SetEnv")
        lines.append(f'SetEnv "{name}={_config_value(value, name)}"')
    lines += [_config_value(line, "extra_config") for line in extra_config]
    lines.append(f"ForceCommand {_config_value(force_command, 'force_command')}")  # last: no Match
    config.write_text("\n".join(lines) + "\n")
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key_line}\n")
    return SshdServer(
        directory=directory,
        host="127.0.0.1",
        port=port,
        ca=ca,
        principals_dir=principals_dir,
        host_key_line=host_key_line,
        known_hosts=known_hosts,
        config=config,
        log_path=directory / "sshd.log",
    )


def start_sshd(
    directory: Path,
    ca: SshCA,
    force_command: str,
    *,
    env: Mapping[str, str] | None = None,
    env_file: Path | str | None = None,
    principals: Mapping[str, Sequence[str]] | None = None,
    extra_config: Sequence[str] = (),
) -> SshdServer:
    """Start sshd with its config, host key and principals in `directory` (new); see the
    `sshd_server` fixture for the arguments. The caller stops it."""
    ensure_gateway_users()
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    if env_file is not None:  # readable by the gateway users, not by everybody
        _check_reachable(Path(env_file))
        os.chown(env_file, 0, grp.getgrnam(GATEWAY_GROUP).gr_gid)
        os.chmod(env_file, 0o640)
    for attempt in range(3):
        server = _write_sshd(
            directory if attempt == 0 else directory.with_name(f"{directory.name}-{attempt}"),
            ca,
            force_command,
            env or {},
            principals or {},
            extra_config,
        )
        try:
            server.start()
            return server
        except RuntimeError:
            if "Address already in use" not in server.log() or attempt == 2:
                raise
    raise AssertionError("not reached")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def _sshd_tools() -> None:
    for tool in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen")):
        if not tool or not os.access(tool, os.X_OK):
            _unavailable("OpenSSH (openssh-server, openssh-client) is not installed")
    ensure_gateway_users()


@pytest.fixture(scope="session")
def _gateway_session_dir(_sshd_tools) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="backup-agent-sshd-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def gateway_tmp_path(_gateway_session_dir, request) -> Path:
    """Like tmp_path, but reachable by the gateway users (root-owned, mode 0755, in /tmp).
    Put what the forced command reads here; make what it writes with make_shared_dir."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60]
    directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_gateway_session_dir))
    directory.chmod(0o755)  # mkdtemp makes it 0700
    return directory


@pytest.fixture(scope="session")
def gateway_agent(_gateway_session_dir) -> GatewayAgent:
    """This checkout's agent as the gateway users can run it, e.g. as a ForceCommand:
    `gateway_agent.command("--env-file", env_file, "gateway")`."""
    return install_gateway_agent(_gateway_session_dir / "agent")


@pytest.fixture
def ssh_ca(gateway_tmp_path) -> SshCA:
    """A fresh user CA; `sshd_server` trusts it unless given another."""
    ca_dir = gateway_tmp_path / "ca"
    ca_dir.mkdir(mode=0o700)
    return SshCA(ca_dir)


@pytest.fixture
def sshd_server(gateway_tmp_path, ssh_ca) -> Iterator[Callable[..., SshdServer]]:
    """A factory: `sshd_server(force_command, *, env=None, env_file=None, principals=None,
    ca=None, extra_config=())` starts an sshd on 127.0.0.1 and a free port and returns its
    SshdServer; all are stopped at the end of the test.

    force_command  sshd's ForceCommand, run as `$SHELL -c force_command` by the user
    env            variables sshd sets for the forced command (SetEnv)
    env_file       a file the forced command reads: given group backupgw, mode 0640
    principals     {user: [principal, ...]}; default: each user accepts its own name
    ca             the SshCA to trust (default: the `ssh_ca` fixture)
    extra_config   more sshd_config lines
    """
    servers: list[SshdServer] = []

    def start(
        force_command: str,
        *,
        env: Mapping[str, str] | None = None,
        env_file: Path | str | None = None,
        principals: Mapping[str, Sequence[str]] | None = None,
        ca: SshCA | None = None,
        extra_config: Sequence[str] = (),
    ) -> SshdServer:
        server = start_sshd(
            gateway_tmp_path / f"sshd{len(servers)}",
            ca or ssh_ca,
            force_command,
            env=env,
            env_file=env_file,
            principals=principals,
            extra_config=extra_config,
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# What `from tests.sshd import *` (in conftest.py) brings: the fixtures. Tests import the
# helpers (SshCA, make_client_key, make_shared_dir, share_tree, ...) from tests.sshd.
__all__ = [
    "_gateway_session_dir",
    "_sshd_tools",
    "gateway_agent",
    "gateway_tmp_path",
    "ssh_ca",
    "sshd_server",
]
