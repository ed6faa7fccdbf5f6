#!/usr/bin/env python3
"""Static checks of the repository's Dockerfile (there is no Docker engine on the build machines).

    check_dockerfile.py REPO_ROOT AGENT_BINARY

What is checked, and how honestly:
- the Dockerfile parses with BuildKit's own parser (PyPI `dockerfile`, Go's moby/buildkit parser);
- stages: a `build` stage and a final `runtime` stage, both on the same Debian release; COPY --from
  names an earlier stage; the runtime stage runs nothing (no compiler, no package manager);
- every COPY source from the build context exists and is not excluded by .dockerignore;
- the dependency layer's placeholder targets cover every target Cargo.toml declares or cargo would
  discover (a missing bench or bin makes cargo refuse the manifest): the layer's RUN is executed in a
  scratch directory with a stand-in `cargo` that checks them;
- ENTRYPOINT is the binary the runtime stage copies in;
- the shared libraries the agent binary links (`ldd`, on a binary built on this Debian machine) and
  the programs the agent runs inside its container (nsenter, sh, logger) come from packages that every
  Debian image of this release has (Priority: required, and what they depend on), when this machine
  runs the same Debian release as the image; otherwise that part is reported as not checked.
Not checked: that the image builds, its size, that the base images exist in the registry.
Prints one line per check and `N passed, N failed`; exits 1 on a failure.
"""
import fnmatch
import os
import re
import subprocess
import sys
import tempfile
import tomllib

import dockerfile

results = []


def check(ok, what, detail=""):
    results.append(ok)
    print(("PASS " if ok else "FAIL ") + what + (f": {detail}" if detail and not ok else ""))


def main():
    root, binary = sys.argv[1], sys.argv[2]
    cmds = dockerfile.parse_file(os.path.join(root, "Dockerfile"))
    check(len(cmds) > 0, "Dockerfile parses with BuildKit's parser")

    # Global ARGs (before the first FROM) and their defaults.
    args = {}
    for c in cmds:
        if c.cmd == "FROM":
            break
        if c.cmd == "ARG":
            for v in c.value:
                k, _, d = v.partition("=")
                args[k] = d
    subst = lambda s: re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), s)

    stages = []  # (name, image, [commands])
    for c in cmds:
        if c.cmd == "FROM":
            v = list(c.value)
            name = v[2] if len(v) >= 3 and v[1].upper() == "AS" else str(len(stages))
            stages.append((name, subst(v[0]), []))
        elif stages:
            stages[-1][2].append(c)
    names = [s[0] for s in stages]
    check(names[:1] == ["build"] and names[-1:] == ["runtime"], "stages build ... runtime", str(names))
    build_img, run_img = stages[0][1], stages[-1][1]
    check(run_img.startswith("docker.io/library/debian:") and run_img.endswith("-slim"),
          "runtime base is debian:<release>-slim", run_img)
    release = run_img.split(":")[1].removesuffix("-slim")
    check(release in build_img, "build and runtime stages use the same Debian release",
          f"{build_img} vs {run_img}")

    # .dockerignore: `*` then `!name` re-includes (the only form used here; checked below).
    ignore = [l.strip() for l in open(os.path.join(root, ".dockerignore")) if l.strip() and not l.startswith("#")]
    check(all(p == "*" or p.startswith("!") for p in ignore), ".dockerignore uses only '*' and '!path'", str(ignore))
    included = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]

    def in_context(path):
        top = path.strip("./").split("/")[0]
        return any(fnmatch.fnmatch(top, inc.split("/")[0]) for inc in included)

    seen = []
    for i, (name, _img, body) in enumerate(stages):
        for c in body:
            if c.cmd != "COPY":
                continue
            frm = [f for f in c.flags if f.startswith("--from=")]
            srcs = list(c.value[:-1])
            if frm:
                ref = frm[0].split("=", 1)[1]
                check(ref in seen, f"COPY --from={ref} names an earlier stage")
                continue
            for s in srcs:
                p = os.path.join(root, s)
                check(os.path.exists(p), f"COPY source {s} exists")
                check(in_context(s), f"COPY source {s} is in the build context (.dockerignore)")
        seen.append(name)

    runtime_body = stages[-1][2]
    check(not any(c.cmd == "RUN" for c in runtime_body), "runtime stage runs nothing (no compiler, no apt)")
    entry = [c for c in runtime_body if c.cmd == "ENTRYPOINT"]
    copy_dest = [c.value[-1] for c in runtime_body if c.cmd == "COPY"]
    check(len(entry) == 1 and entry[0].json and entry[0].value[0] in copy_dest,
          "ENTRYPOINT (exec form) is the copied binary", f"{entry} {copy_dest}")

    # The dependency layer: run its RUN with a stand-in cargo that checks the placeholder targets.
    build_runs = [c for c in stages[0][2] if c.cmd == "RUN"]
    manifest = tomllib.load(open(os.path.join(root, "Cargo.toml"), "rb"))
    need = {manifest.get("lib", {}).get("path", "src/lib.rs")}
    need |= {b.get("path") or f"src/bin/{b['name']}.rs" for b in manifest.get("bin", [])}
    need |= {b.get("path") or f"benches/{b['name']}.rs" for b in manifest.get("bench", [])}
    need |= {f"src/bin/{f}" for f in os.listdir(os.path.join(root, "src/bin")) if f.endswith(".rs")}
    with tempfile.TemporaryDirectory() as d:
        work = os.path.join(d, "src")
        fakebin = os.path.join(d, "bin")
        os.makedirs(work)
        os.makedirs(fakebin)
        for f in ("Cargo.toml", "Cargo.lock"):
            open(os.path.join(work, f), "wb").write(open(os.path.join(root, f), "rb").read())
        report = os.path.join(d, "cargo-called")
        with open(os.path.join(fakebin, "cargo"), "w") as f:
            f.write("#!/usr/bin/env python3\nimport os, sys\n"
                    f"need = {sorted(need)!r}\n"
                    "missing = [p for p in need if not os.path.isfile(p)]\n"
                    f"open({report!r}, 'a').write(' '.join(sys.argv[1:]) + ' missing=' + ','.join(missing) + '\\n')\n"
                    "sys.exit(1 if missing else 0)\n")
        os.chmod(os.path.join(fakebin, "cargo"), 0o755)
        first = build_runs[0]
        shell = " ".join(first.value)
        r = subprocess.run(["sh", "-ec", shell], cwd=work, capture_output=True, text=True,
                           env=dict(os.environ, PATH=fakebin + ":" + os.environ["PATH"]))
        calls = open(report).read() if os.path.exists(report) else ""
        check(r.returncode == 0 and "build --release --locked --bin drbd-reactor missing=\n" in calls,
              f"dependency layer's placeholders cover every cargo target ({len(need)})",
              f"rc={r.returncode} calls={calls!r} {r.stderr}")
        check(not os.path.exists(os.path.join(work, "src")), "dependency layer removes its placeholders")

    # Runtime dependencies against Debian's required package set.
    codename = ""
    try:
        for l in open("/etc/os-release"):
            if l.startswith("VERSION_CODENAME="):
                codename = l.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    if codename != release or not shutil_which("dpkg-query"):
        print(f"NOT CHECKED runtime libraries: this machine is '{codename}', the image is '{release}'")
    else:
        closure = required_closure()
        check("libc6" in closure and "gcc-12" not in closure and "cpp" not in closure,
              "the required-package closure has libc6 and no compiler", str(len(closure)))
        libs = []
        for line in subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout.splitlines():
            m = re.search(r"=> (/\S+)", line) or re.match(r"\s*(/\S+)", line)
            if m:
                libs.append(m.group(1))
        check(len(libs) >= 2, "ldd lists the binary's libraries", str(libs))
        for lib in libs + ["/usr/bin/nsenter", "/bin/sh", "/usr/bin/logger"]:
            pkg = owner(lib)
            check(pkg in closure, f"{lib} ({pkg}) is in every {release} image (required packages)")
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


def shutil_which(cmd):
    import shutil
    return shutil.which(cmd)


def owner(path):
    """The Debian package that ships `path` (following /lib -> /usr/lib style links)."""
    for p in dict.fromkeys([path, os.path.realpath(path)]):
        # usrmerge: dpkg may know /lib/x86_64-linux-gnu/... while ldd prints /usr/lib/..., or the reverse
        for q in (p, p[4:] if p.startswith("/usr/") else "/usr" + p):
            r = subprocess.run(["dpkg-query", "-S", q], capture_output=True, text=True)
            for line in r.stdout.splitlines() if r.returncode == 0 else []:
                if not line.startswith("diversion by"):
                    return line.split(":")[0].split(",")[0].strip()
    return None


def required_closure():
    """Packages with Priority required (what debian:<release>-slim is made of) plus their dependencies."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Priority}\t${Pre-Depends}, ${Depends}\n"],
                         capture_output=True, text=True, check=True).stdout
    deps, todo = {}, []
    for line in out.splitlines():
        pkg, prio, d = line.split("\t")
        deps[pkg] = [alt.split("|")[0].split("(")[0].split(":")[0].strip() for alt in d.split(",") if alt.strip()]
        if prio == "required":
            todo.append(pkg)
    seen = set()
    while todo:
        p = todo.pop()
        if p in seen or p not in deps:
            continue
        seen.add(p)
        todo.extend(deps[p])
    return seen


if __name__ == "__main__":
    main()
