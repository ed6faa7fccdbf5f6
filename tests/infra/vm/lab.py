#!/usr/bin/env python3
"""The host side of the lab's guest agent (guest/lab-agent.sh) and of QMP.

  lab.py exec SOCKET SCRIPT [TIMEOUT]   run a bash script in the guest; print its output; exit with its code
  lab.py wait SOCKET [TIMEOUT]          wait until the agent answers
  lab.py qmp SOCKET JSON                one QMP command (after the capabilities handshake)
"""
import base64, json, os, socket, sys, time


def run(path, script, timeout):
    rid = os.urandom(6).hex()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(min(timeout, 10))
    s.connect(path)
    s.settimeout(timeout)
    s.sendall(f"{rid} {base64.b64encode(script.encode()).decode()}\n".encode())
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            parts = line.split(b" ")
            # replies to earlier requests (a client that gave up) carry other ids: drop them
            if len(parts) >= 3 and parts[0] == b"@@R" and parts[1].decode(errors="replace") == rid:
                out = base64.b64decode(parts[3]) if len(parts) > 3 else b""
                s.close()
                return int(parts[2]), out
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer from the guest agent within {timeout} s")
        s.settimeout(left)
        d = s.recv(1 << 16)
        if not d:
            raise EOFError("guest agent socket closed")
        buf += d


def main():
    verb, path = sys.argv[1], sys.argv[2]
    if verb == "exec":
        timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 300
        try:
            rc, out = run(path, sys.argv[3], timeout)
        except (OSError, TimeoutError, EOFError) as e:
            sys.exit(f"lab.py: {path}: {e}")
        sys.stdout.buffer.write(out)
        sys.exit(rc)
    if verb == "wait":
        timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 300
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                rc, out = run(path, "echo lab-ready", 5)
                if rc == 0 and b"lab-ready" in out:
                    print(f"{time.monotonic() - t0:.1f}")
                    return
            except (OSError, TimeoutError, EOFError):
                pass
            time.sleep(0.5)
        sys.exit(f"lab.py: {path}: agent not ready after {timeout} s")
    if verb == "qmp":
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(path)
        f = s.makefile("rw")
        f.readline()
        f.write('{"execute":"qmp_capabilities"}\n'); f.flush(); f.readline()
        f.write(sys.argv[3] + "\n"); f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                print(json.dumps(r))
                sys.exit(1 if "error" in r else 0)
    sys.exit(__doc__)


if __name__ == "__main__":
    main()
