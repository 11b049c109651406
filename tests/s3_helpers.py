"""A real S3 API on localhost for the object-storage tests: moto in server mode (as s3fs's own
tests run it), with IAM authentication on, so that wrong credentials are refused as on AWS.

:func:`start_s3_server` starts ``python -m moto.server`` on a free 127.0.0.1 port, makes one
IAM user allowed ``s3:*`` and its access key (moto accepts the first few requests without
credentials: ``INITIAL_NO_AUTH_ACTION_COUNT``), and returns what a client needs. Every request
the server answers is one line of its log (``requests``), which is how the tests count them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# The three IAM calls that make the test user and its key are the only unauthenticated ones.
_UNAUTHENTICATED_SETUP_CALLS = 3
_LOG_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def require_s3_test_tools() -> None:
    """moto (server) and s3fs must be installed: in CI (``CI`` set) their absence fails the
    run; elsewhere the S3 tests are skipped, saying why."""
    missing = []
    for module in ("moto.server", "s3fs", "boto3", "flask"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        reason = f"S3 tests need {', '.join(missing)} (pip install -c constraints.txt -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class S3Server:
    """A running moto S3 server and the credentials of its one user."""

    endpoint: str
    key: str
    secret: str
    log: Path
    process: subprocess.Popen

    def env(self, **overrides: str) -> dict[str, str]:
        """Environment variables that point any AWS client (s3fs, boto3) at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            **overrides,
        }

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request answered so far, in order."""
        text = _ANSI.sub("", self.log.read_text(errors="replace"))
        return [(m["method"], m["path"], int(m["status"])) for m in _LOG_LINE.finditer(text)]

    def requests_after(self, count: int, settle_s: float = 0.3) -> list[tuple[str, str, int]]:
        """The requests logged after the first ``count``, once the log stops growing (the server
        writes a line just after it answers)."""
        seen = -1
        while True:
            got = self.requests()
            if len(got) == seen:
                return got[count:]
            seen = len(got)
            time.sleep(settle_s)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_s3_server(folder: Path, timeout_s: float = 60.0) -> S3Server:
    """Start moto's S3 server on a free 127.0.0.1 port, with one IAM user allowed ``s3:*``."""
    import boto3

    port = free_port()
    log = folder / "moto_server.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_UNAUTHENTICATED_SETUP_CALLS)}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            break
        except OSError as err:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from err
            time.sleep(0.2)
    setup = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **setup)
    iam.create_user(UserName="scratchpath-tests")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(
        UserName="scratchpath-tests", PolicyName="s3", PolicyDocument=json.dumps(policy)
    )
    access = iam.create_access_key(UserName="scratchpath-tests")["AccessKey"]
    return S3Server(endpoint, access["AccessKeyId"], access["SecretAccessKey"], log, process)
