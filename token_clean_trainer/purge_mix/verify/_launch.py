"""The sandbox's launcher: the first program that runs inside the fresh namespaces (never imported by the package).

`sandbox.py` starts it as `unshare -rnm --pid --fork --kill-child python -s -S -B _launch.py WRITABLE NPROC MODE -- ARGV`
(MODE `program` for untrusted code, `tool` for a trusted parser such as `gcc -fsyntax-only` that starts its own
subprocesses: the tool mode allows process creation and keeps everything else).
It is root of its own user namespace there and uses that, before it gives it up for good, to:

1. make every mount read-only except the sandbox's temporary folder (a bind mount onto itself), so no file outside it
   can be written even by a process that is root (uid 0) outside the namespace;
2. set RLIMIT_NPROC here, inside the new user namespace: the kernel counts processes per user and namespace, so the
   limit covers this sandbox only (set before `unshare`, it would count every process of the calling user);
3. install a seccomp filter (no new privileges) that refuses to create processes (`fork`, `vfork`, `clone` without
   `CLONE_THREAD`; threads are allowed), sockets (`socketpair` stays: asyncio needs one, and it reaches nothing),
   mounts, new namespaces, ptrace, bpf and io_uring (whose operations would not pass through this filter):
   kernel-enforced, so it holds for root too, where RLIMIT_NPROC does not apply;
4. exec ARGV (the Python bootstrap or node), which inherits all of it.

Any failure exits with `SETUP_EXIT` and a line on stderr: the sandbox then refuses to run the program.
"""

import ctypes
import errno
import os
import platform
import resource
import struct
import sys

SETUP_EXIT = 112

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
# statvfs's f_flag bits and the mount flags they stand for: a bind remount must repeat the flags that the kernel
# locked when this mount namespace was copied, or it fails with EPERM.
_ST_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME}
_ST_RELATIME = 4096

# Syscall numbers per architecture (AUDIT_ARCH value, {name: number}).
_ARCHES = {
    "x86_64": (
        0xC000003E,
        {
            "socket": 41, "clone": 56, "fork": 57, "vfork": 58, "ptrace": 101, "pivot_root": 155, "chroot": 161,
            "mount": 165, "umount2": 166, "unshare": 272, "setns": 308, "process_vm_writev": 311, "open_tree": 428,
            "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
            "mount_setattr": 442, "bpf": 321, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51, "unshare": 97, "ptrace": 117, "socket": 198,
            "clone": 220, "setns": 268, "process_vm_writev": 271, "open_tree": 428, "move_mount": 429, "fsopen": 430,
            "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435, "mount_setattr": 442, "bpf": 280,
            "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        },
    ),
}  # fmt: skip
CLONE_THREAD = 0x00010000
_X32_BIT = 0x40000000


def _fail(what: str) -> None:
    os.write(2, f"sandbox setup failed: {what}\n".encode())
    os._exit(SETUP_EXIT)


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            # Field 5 is the mount point, with space, tab, newline and backslash written as octal escapes.
            raw = line.split()[4]
            points.append(raw.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace"))
    return points


def make_read_only(writable: str) -> None:
    """Bind `writable` onto itself, then remount every other mount read-only (in this mount namespace only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
    if libc.mount(writable.encode(), writable.encode(), None, MS_BIND | MS_REC, None) != 0:
        _fail(f"bind mount of {writable}: {os.strerror(ctypes.get_errno())}")
    for point in _mount_points():
        if point == writable:
            continue
        try:
            st_flags = os.statvfs(point).f_flag
        except OSError:
            continue  # a mount point hidden under a later mount, or gone: nothing reachable to protect
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | (MS_RELATIME if st_flags & _ST_RELATIME else 0)
        flags |= sum(ms for st, ms in _ST_TO_MS.items() if st_flags & st)
        if libc.mount(None, point.encode(), None, flags, None) != 0:
            code = ctypes.get_errno()
            if code not in (errno.ENOENT, errno.EINVAL):
                _fail(f"read-only remount of {point}: {os.strerror(code)}")


def _filter_program(arch: str, processes: bool) -> bytes:
    """A classic-BPF seccomp program: allow everything except process creation (unless `processes`), sockets, mounts
    and namespaces."""
    audit_arch, numbers = _ARCHES[arch]
    process_calls = ("clone", "clone3", "fork", "vfork")
    denied = [number for name, number in numbers.items() if name not in process_calls]
    if not processes:
        denied += [numbers[name] for name in ("fork", "vfork") if name in numbers]  # aarch64 has only clone
    # Instructions as (code, jump_if_true, jump_if_false, k); the jumps are filled with labels, resolved below.
    prog = [(0x20, 0, 0, 4), (0x15, 0, "kill", audit_arch), (0x20, 0, 0, 0)]
    if arch == "x86_64":
        prog.append((0x35, "eperm", 0, _X32_BIT))  # x32 syscalls (nr | 0x40000000) would bypass the numbers below
    prog += [(0x15, "eperm", 0, number) for number in denied]
    if not processes:
        # clone3 gets ENOSYS so that glibc falls back to clone, whose flags (unlike clone3's struct) the filter reads.
        prog += [(0x15, "enosys", 0, numbers["clone3"]), (0x15, 0, "allow", numbers["clone"])]
        prog += [(0x20, 0, 0, 16), (0x45, "allow", "eperm", CLONE_THREAD)]  # args[0] (flags, low 32 bits)
    # The return instructions close the program; "allow" comes first, where the last test falls through.
    returns = {"allow": 0x7FFF0000, "eperm": 0x00050000 | errno.EPERM, "enosys": 0x00050000 | errno.ENOSYS}
    returns["kill"] = 0x80000000  # SECCOMP_RET_KILL_PROCESS: a syscall of another ABI than the one filtered
    labels = list(returns)

    def offset(jump, i):  # BPF jumps count the instructions skipped after the current one
        return len(prog) + labels.index(jump) - i - 1 if isinstance(jump, str) else jump

    out = [struct.pack("HBBI", code, offset(jt, i), offset(jf, i), k) for i, (code, jt, jf, k) in enumerate(prog)]
    out += [struct.pack("HBBI", 0x06, 0, 0, value) for value in returns.values()]
    return b"".join(out)


def install_seccomp(processes: bool) -> None:
    arch = platform.machine()
    if arch not in _ARCHES:
        _fail(f"no seccomp filter for the {arch} architecture")
    libc = ctypes.CDLL(None, use_errno=True)
    program = _filter_program(arch, processes)
    buffer = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        _fail(f"no_new_privs: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        _fail(f"seccomp: {os.strerror(ctypes.get_errno())}")


def main() -> None:
    writable, nproc, mode, separator, *argv = sys.argv[1:]
    if separator != "--" or not argv or mode not in ("program", "tool"):
        _fail("usage: _launch.py WRITABLE NPROC program|tool -- ARGV...")
    make_read_only(writable)
    # The working directory still points into the mount it was entered from (now read-only): enter it again, through
    # the writable bind mount.
    os.chdir(writable)
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (int(nproc), int(nproc)))
    except (ValueError, OSError) as error:
        _fail(f"RLIMIT_NPROC: {error}")
    install_seccomp(processes=mode == "tool")
    try:
        os.execv(argv[0], argv)  # noqa: S606 - the confined program itself, an argument list, never a shell
    except OSError as error:
        _fail(f"exec {argv[0]}: {error}")


if __name__ == "__main__":
    main()
