"""A throwaway PostgreSQL cluster for the tests (Debian's postgresql package; .ci/run installs it)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .ports import free_port as _free_port


class Cluster:
    """initdb + pg_ctl in a temp dir, on a free loopback port, C collation, trust auth for `henge`.
    As root, PostgreSQL refuses to run: it runs as the `postgres` user the package creates."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
        assert bins, "no PostgreSQL server: apt-get install postgresql (.ci/run does)"
        self.bin = Path(bins[-1])
        self.base = Path(tempfile.mkdtemp(prefix="henge-pg-", dir="/tmp"))
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.base, "postgres")
        os.chmod(self.base, 0o700)
        self._run("initdb", "-D", str(self.base / "data"), "-A", "trust", "-U", "henge", "--locale=C", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(self.base / "data"), "-l", str(self.base / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self._count = 0

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, f"{tool}: {done.stderr}"

    def new_database(self) -> str:
        import psycopg

        self._count += 1
        name = f"henge_test_{self._count}"
        with psycopg.connect(f"postgresql://henge@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://henge@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.base / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.base, ignore_errors=True)
