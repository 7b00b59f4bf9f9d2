"""An S3 emulator (moto) on 127.0.0.1 with one bucket, for tests of durable broker storage and of
archive and registry URIs on ``s3://``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from consumers.broker import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


class MotoS3:
    """``moto_server`` with ``bucket`` created; ``env`` points tansu at it, ``endpoint`` the others."""

    def __init__(self, bucket: str = "tansu", log: Path | None = None) -> None:
        port = free_port()
        # The environment's own, pinned moto first: another moto_server on PATH (an older one)
        # answers pyarrow's multipart uploads with an error inside a 200 response.
        ours = Path(sys.executable).with_name("moto_server")
        exe = str(ours) if ours.exists() else shutil.which("moto_server") or "moto_server"
        self.log = log.open("wb") if log is not None else None
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=self.log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.url = f"s3://{bucket}/"
        self.env = {**CREDENTIALS, "AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true"}
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().create_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="test",
                            aws_secret_access_key="test")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        if self.log is not None:
            self.log.close()
