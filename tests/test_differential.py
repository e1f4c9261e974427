"""Differential: every config in tests/stunnel-corpus/ is checked by Debian's stunnel4 and by
`pytunnel check --stunnel-defaults`; both must accept it or both must reject it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, Certs, need_stunnel, pytunnel_cmd

CORPUS = ROOT / "tests" / "stunnel-corpus"
FILES = sorted(p.name for p in CORPUS.glob("*.conf"))

# Deliberate differences, each with its reason.  Keep this short and honest.
KNOWN_DIFFERENCES: dict[str, str] = {}


def materialise(name: str, tmp_path: Path, certs: Certs) -> Path:
    inc = tmp_path / "include.d"
    if not inc.exists():
        shutil.copytree(CORPUS / "include.d", inc)
    data = (CORPUS / name).read_bytes()  # bytes: a corpus file may hold another encoding
    data = (
        data.replace(b"@CERT@", str(certs.server_pem).encode())
        .replace(b"@CA@", str(certs.ca_pem).encode())
        .replace(b"@DIR@", str(inc).encode())
    )
    path = tmp_path / name
    path.write_bytes(data)
    return path


def stunnel_accepts(path: Path, tmp_path: Path) -> tuple[bool, str]:
    log = tmp_path / f"{path.stem}.stunnel.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([need_stunnel(), str(path)], stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "Configuration successful" in text:
                return True, text
            if proc.poll() is not None:
                text = log.read_text(errors="replace")
                return "Configuration successful" in text, text
            time.sleep(0.02)
        raise AssertionError(f"stunnel4 neither started nor failed on {path.name}:\n{log.read_text()}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def pytunnel_accepts(path: Path) -> tuple[bool, str]:
    out = subprocess.run(
        pytunnel_cmd("check", "--stunnel-defaults", str(path)),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode in (0, 1), out.stderr
    return out.returncode == 0, out.stderr


def test_corpus_is_big_enough() -> None:
    assert len(FILES) >= 30
    assert sum(f.startswith("good-") for f in FILES) >= 15
    assert sum(f.startswith("bad-") for f in FILES) >= 15


@pytest.mark.parametrize("name", FILES)
def test_same_verdict_as_stunnel4(name: str, tmp_path: Path, certs: Certs) -> None:
    path = materialise(name, tmp_path, certs)
    st_ok, st_log = stunnel_accepts(path, tmp_path)
    py_ok, py_log = pytunnel_accepts(path)
    expected = name.startswith("good-")
    if name in KNOWN_DIFFERENCES:
        assert st_ok != py_ok, f"{name} is listed as a known difference but both agree now"
        return
    assert st_ok == expected, f"corpus label is wrong for {name}: stunnel4 said {st_ok}\n{st_log}"
    assert py_ok == st_ok, (
        f"{name}: stunnel4 {'accepts' if st_ok else 'rejects'}, pytunnel does not\n{py_log}"
    )
    if not py_ok:
        assert "Configuration failed" in py_log
        assert f"{path}:" in py_log or "Service [" in py_log, py_log
